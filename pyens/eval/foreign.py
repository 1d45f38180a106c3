"""Models and data from outside pyens, for ``pyens eval --model``.

- :func:`load_model`: a factory ``package.module:function`` (or ``path/to/file.py:function``)
  built with keyword arguments and given a state dict read with ``torch.load(weights_only=True)``
  (tensors only: the weights file runs no code); or a ``torch.export`` program (``.pt2``) or a
  TorchScript module (``.ts``). Unlike a state dict, a ``.pt2`` or ``.ts`` file is a program:
  load one only from a source you would take code from.
- :class:`PixelSpace`: ``--normalize mean=...,std=...`` puts the model's input normalisation in
  front of it, so that attacks, radii and the [0, 1] box stay in pixel space.
- :class:`Autocast`: ``--autocast bf16|fp16`` runs the model's forward in lower precision.
- :func:`load_data`: ``--data``: a pyens dataset name, an ``.npz`` file or an image folder.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from pyens.nn.normalize import Normalize

MODEL_EXPECT = ("--model takes a factory 'package.module:function' or 'path/to/file.py:function' (with --weights "
                "STATE_DICT.pt), a torch.export program (.pt2) or a TorchScript module (.ts)")
TORCHSCRIPT = (".ts", ".torchscript", ".jit")
NORMALIZE_PRESETS = {"mnist": ((0.1307,), (0.3081,)), "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                     "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PixelSpace(nn.Module):
    """``model(normalize(x))``: a model that expects normalised inputs, taking pixels in [0, 1].

    Args:
        model: ``[B, C, H, W]`` normalised images -> ``[B, K]`` logits.
        mean, std: per-channel constants (length C or 1) of :class:`pyens.nn.Normalize`.

    The constants live in a submodule, never as ``.mean``/``.std`` of this module: torchattacks
    reads those two attributes off the model it attacks and would normalise a second time.
    """

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


class Frozen(nn.Module):
    """A loaded program (``torch.export``, TorchScript) whose train/eval mode was fixed when it
    was saved: ``.eval()`` (which evaluation calls) leaves it as it is, since an exported
    module refuses ``eval()``."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


class Autocast(nn.Module):
    """``model``'s forward under ``torch.autocast(dtype)`` (``torch.bfloat16`` or ``torch.float16``),
    logits returned in float32 ``[B, K]``; inputs and gradients stay float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.model(x)
        return out.float()


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"mean=0.49,0.48,0.45,std=0.25,0.24,0.26"`` (or ``mnist``, ``cifar10``, ``imagenet``)
    -> ``(mean, std)``; a ValueError naming ``--normalize`` otherwise."""
    from pyens.eval.threats import parse_number

    text = text.strip()
    if text in NORMALIZE_PRESETS:
        return NORMALIZE_PRESETS[text]
    usage = (f"--normalize: expected mean=M1[,M2,M3],std=S1[,S2,S3] (one value per channel, or one for all) or one "
             f"of {', '.join(NORMALIZE_PRESETS)}, got {text!r}")
    head, sep, std = text.partition("std=")
    if not head.startswith("mean=") or not sep:
        raise ValueError(usage)
    split = lambda s: [v for v in s.split(",") if v.strip()]  # noqa: E731
    mean = tuple(parse_number(v, "--normalize mean") for v in split(head[len("mean="):]))
    std = tuple(parse_number(v, "--normalize std") for v in split(std))
    if not mean or len(mean) != len(std):
        raise ValueError(f"{usage} (mean and std need as many values)")
    if min(std) <= 0:
        raise ValueError(f"--normalize: std must be > 0, got {std}")
    return mean, std


def _import_factory(spec: str):
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"{MODEL_EXPECT}; got {spec!r}")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--model {spec}: {path} not found")
        mod_spec = importlib.util.spec_from_file_location(f"_pyens_model_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        # As `python -m` does: the current folder first, so a user's own package is found.
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ValueError(f"--model {spec}: cannot import {target!r} ({exc}); run from the folder that holds it, "
                             "or give a file path, path/to/file.py:function") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec}: {target} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--model {spec}: {attr} is a {type(obj).__name__}, not a function or class")
    return obj


def _state_dict(weights: Path) -> dict:
    """The state dict in ``weights`` (``torch.load(weights_only=True)``): the file's dict of
    tensors, or one held under ``state_dict`` / ``model_state_dict`` / ``model``; a
    ``module.`` prefix on every key (a DDP model's) is dropped."""
    import pickle

    if not weights.is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file")
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"--weights {weights}: not loadable with torch.load(weights_only=True), which reads "
                         f"tensors only ({str(exc).splitlines()[0]}); save model.state_dict()") from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in ("state_dict", "model_state_dict", "model") if isinstance(obj.get(k), dict)]
        if not inner:
            raise ValueError(f"--weights {weights}: a dict without a state dict (keys {sorted(map(str, obj))[:8]}); "
                             "save model.state_dict()")
        obj = obj[inner[0]]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"--weights {weights}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    if all(str(k).startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(spec: str, *, weights: str | Path | None = None, model_args: dict | None = None,
               normalize: tuple | None = None) -> tuple[nn.Module, dict]:
    """``(model, info)``: the model ``spec`` names, in eval mode, on the CPU.

    Args:
        spec: ``"package.module:function"`` / ``"path/to/file.py:function"`` (a function or
            class returning an ``nn.Module``; ``package.module`` is imported as ``python -m``
            would, from the current folder first), or a ``.pt2`` (``torch.export.save``) /
            ``.ts`` (``torch.jit.save``) file.
        weights: a state dict for the factory's model (``torch.save(model.state_dict(), path)``),
            loaded with ``weights_only=True`` and ``strict=True``.
        model_args: keyword arguments of the factory.
        normalize: ``(mean, std)``: the model expects normalised inputs; it is wrapped in
            :class:`PixelSpace`.

    ``info`` records where the model came from (kept in ``eval.json``).
    """
    info: dict = {"model": spec, "weights": None if weights is None else str(weights), "model_args": model_args or {},
                  "normalize": None if normalize is None else {"mean": list(normalize[0]), "std": list(normalize[1])}}
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if ":" not in spec or suffix in (".pt2", *TORCHSCRIPT, ".pt"):
        if weights is not None or model_args:
            raise ValueError(f"--weights and --model-arg go with a factory --model package.module:function; {spec} "
                             "is a saved program that holds its own weights")
        if not path.is_file():
            raise FileNotFoundError(f"--model {spec}: no such file; {MODEL_EXPECT}")
        info["sha256"] = sha256(path)
        if suffix == ".pt2":
            model = Frozen(torch.export.load(path).module())
        elif suffix in (*TORCHSCRIPT, ".pt"):
            try:
                model = Frozen(torch.jit.load(str(path), map_location="cpu"))
            except RuntimeError as exc:
                raise ValueError(f"--model {spec}: not a TorchScript file ({str(exc).splitlines()[0]}); a state dict "
                                 "goes with --model package.module:function --weights FILE") from None
        else:
            raise ValueError(f"--model {spec}: unknown file type {suffix or '(none)'}; {MODEL_EXPECT}")
    else:
        factory = _import_factory(spec)
        try:
            model = factory(**(model_args or {}))
        except TypeError as exc:
            raise ValueError(f"--model {spec}: the factory refused --model-arg {model_args or {}} ({exc})") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model {spec}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
        if weights is not None:
            state = _state_dict(Path(weights).expanduser())
            info["sha256"] = sha256(Path(weights).expanduser())
            missing, unexpected = _diff_keys(model, state)
            if missing or unexpected:
                raise ValueError(f"--weights {weights} does not fit the model {spec} built: "
                                 + "; ".join(f"{what} {len(keys)} key(s) ({', '.join(keys[:4])}"
                                             f"{', ...' if len(keys) > 4 else ''})"
                                             for what, keys in (("missing", missing), ("unexpected", unexpected))
                                             if keys))
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:  # e.g. a tensor of the wrong shape
                raise ValueError(f"--weights {weights} does not fit the model {spec} built: "
                                 f"{str(exc).splitlines()[-1].strip()}") from None
    if normalize is not None:
        model = PixelSpace(model, *normalize)
    return model.eval(), info


def _diff_keys(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    want = set(model.state_dict())
    return sorted(want - set(state)), sorted(set(state) - want)


def check_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Run ``model`` on a batch of 3 of the images ``x [n, C, H, W]`` (odd, unlike most
    saved batch sizes) and return its class count K; a ValueError naming ``--model`` when it
    fails, or its output is not finite logits ``[3, K]`` with K above every label of ``y``."""
    xb = x[:3]
    try:
        with torch.no_grad():
            out = model(xb)
    except Exception as exc:  # noqa: BLE001 - any failure of a user's model is reported with the shapes
        hint = (" (a torch.export program keeps the batch size it was exported with unless exported with "
                "dynamic_shapes={'x': {0: torch.export.Dim('batch')}})") if "Guard failed" in str(exc) else ""
        raise ValueError(f"--model: the model fails on images of shape {tuple(xb.shape)} from --data: "
                         f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{hint}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(xb):
        raise ValueError(f"--model: expected logits [B, K] for images {tuple(xb.shape)}, got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    k = out.shape[1]
    if int(y.max()) >= k:
        raise ValueError(f"--model has {k} outputs but --data has label {int(y.max())}: model and data disagree")
    if not bool(torch.isfinite(out).all()):
        raise ValueError("--model: the model's logits are NaN or infinite on --data's first images")
    return k


def parse_resize(text: str | None) -> tuple[int, int] | None:
    """``"32"`` or ``"32x48"`` (H x W) -> ``(H, W)``; None stays None."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--resize: expected H or HxW in pixels, got {text!r}") from None
    if len(size) not in (1, 2) or min(size) < 1:
        raise ValueError(f"--resize: expected H or HxW in pixels >= 1, got {text!r}")
    return size * 2 if len(size) == 1 else size


def load_data(data: str, *, data_dir: str | None = None, resize: tuple[int, int] | None = None,
              n: int | None = None):
    """``--data``: a dataset name of :data:`pyens.data.NAMES` (its test split; ``mnist`` without
    ``--data-dir`` is the embedded set), an ``.npz`` (:func:`pyens.data.load_npz`) or an image
    folder (:func:`pyens.data.load_image_folder`, ``n`` images decoded, ``resize`` ``(H, W)``)."""
    from pyens.data import NAMES, load, load_image_folder, load_npz

    if data in NAMES:
        if resize is not None:
            raise ValueError(f"--resize applies to an image folder; {data} keeps its own size")
        return load(data, "test", data_dir=data_dir)
    if data_dir is not None:
        raise ValueError(f"--data-dir goes with a dataset name ({', '.join(NAMES)}); --data {data} is a path")
    path = Path(data).expanduser()
    if path.suffix.lower() == ".npz":
        if resize is not None:
            raise ValueError("--resize applies to an image folder; an .npz keeps its arrays' size")
        return load_npz(path)
    if path.is_dir():
        return load_image_folder(path, size=resize, n=n)
    raise FileNotFoundError(f"--data {data}: not a dataset name ({', '.join(NAMES)}), an .npz file or an image "
                            "folder")


def model_checks(model: nn.Module, data, report, threat: dict, *, low: nn.Module | None = None, n: int = 100,
                 steps: int = 50, batch_size: int = 250, device="cpu", seed: int = 0) -> list:
    """The sanity checks ``pyens eval --model`` runs (:mod:`pyens.eval.sanity`): those read off
    ``report`` (black-box vs white-box), an unbounded linf PGD (eps 1, the whole box, ``steps``
    steps) reaching ~0% on the first ``n`` examples, and, given the low-precision model ``low``
    (:class:`Autocast`), PGD of the threat's first norm run on ``model`` in float32 and on
    ``low`` with the same seed (:func:`~pyens.eval.sanity.precision_agrees`).
    ``threat``: ``{norm: eps}``."""
    from types import SimpleNamespace

    from pyens.eval.catalogue import AttackSpec, quick_alpha
    from pyens.eval.robustness import evaluate
    from pyens.eval.sanity import precision_agrees, run_checks, unbounded_reaches_zero

    def pgd(norm: str, eps: float, label: str) -> AttackSpec:
        from pyens.attacks import PGD

        p = dict(norm=norm, eps=eps, alpha=quick_alpha(norm, eps, steps), steps=steps)
        return AttackSpec(label, norm, lambda m: PGD(m, **p), p, norm, eps)

    def accuracy(m: nn.Module, spec: AttackSpec) -> float:
        r = evaluate(m, data, attacks=[spec], n=n, batch_size=batch_size, device=device, seed=seed, progress=False)
        return r.accuracy(spec.name)

    checks = [c for c in run_checks(report) if c.passed is not None]
    judged = low if low is not None else model
    unbounded = accuracy(judged, pgd("linf", 1.0, "PGD linf unbounded"))
    count = min(n, report.n)
    checks.append(unbounded_reaches_zero(SimpleNamespace(n=count, unbounded={
        "norm": "linf", "eps": 1.0, "steps": steps, "accuracy": unbounded})))
    if low is not None:
        norm, eps = next(iter(threat.items()))
        spec = pgd(norm, eps, f"PGD {norm} {eps:g}")
        what = f"PGD {norm} eps {eps:g}, {steps} steps, {str(low.dtype).replace('torch.', '')}"
        checks.append(precision_agrees(accuracy(model, spec), accuracy(low, spec), count, what))
    return checks


def summary(report, checks: list | None = None) -> dict:
    """``pyens eval --summary``'s line: clean accuracy, the per-norm worst cases, the union over
    every attack, and the names of the failed sanity checks."""
    from pyens.eval.results import GROUP_TITLES

    acc = report.accuracies()
    per_norm = {g: acc[t] for g, t in GROUP_TITLES.items() if t in acc}
    if checks is None:
        checks = report.meta.get("checks", [])
    flags = [c["name"] if isinstance(c, dict) else c.name for c in checks
             if (c["passed"] if isinstance(c, dict) else c.passed) is False]
    return {"model": report.model, "n": report.n, "clean": acc["Clean accuracy"], "per_norm": per_norm,
            "union": acc.get("All attacks"), "flags": flags}
