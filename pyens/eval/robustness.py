"""``pyens.evaluate``: run the attack catalogue on a model, batched, and report per example."""
from __future__ import annotations

import json
import numbers
import time
from collections.abc import Callable

import torch
from torch import nn

from pyens.eval.autoattack import for_randomized, sub_results
from pyens.eval.catalogue import DEFAULT_PRESET, NO_RADII, PRESETS, AttackSpec, preset_attacks
from pyens.eval.results import AttackResult, RobustnessReport

# Relative and absolute slack on the radius check: float32 rounding of a projected perturbation.
EPS_RTOL, EPS_ATOL = 1e-4, 1e-5


def library_versions() -> dict:
    """Versions of pyens and the attack libraries (None: not installed), kept in every report."""
    from importlib.metadata import PackageNotFoundError, version

    import pyens

    out = {"pyens": pyens.__version__, "torch": torch.__version__}
    for lib in ("torchattacks", "foolbox"):
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def lp_norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row norm of ``d: [B, ...]`` -> ``[B]``; ``norm`` is ``"linf"``, ``"l2"`` or ``"l1"``."""
    d = d.flatten(1)
    if norm == "linf":
        return d.abs().amax(1)
    if norm == "l2":
        return d.norm(dim=1)
    if norm == "l1":
        return d.abs().sum(1)
    raise ValueError(f"norm must be 'linf', 'l2' or 'l1', got {norm!r}")


def targets(model, surrogate: nn.Module | None = None) -> tuple[nn.Module, nn.Module]:
    """``(predict, attack)``: the classifier whose decisions are judged, and the differentiable
    classifier gradient attacks use (both ``[B, C, H, W] -> [B, K]``).

    - A member ensemble (MIMO, :class:`pyens.nn.Ensemble`: anything with ``.ensemble``) is
      judged and attacked through its averaged output (:func:`pyens.training.classifier`).
    - A model with a ``surrogate`` (a module, or a method returning one; e.g. a DML
      ensemble whose majority vote is not differentiable) is judged by its own output and
      attacked through the surrogate; ``surrogate=`` overrides it.
    - Anything else is both.
    """
    from pyens.training import classifier

    predict = classifier(model) if hasattr(model, "ensemble") else model
    if surrogate is None:
        surrogate = getattr(model, "surrogate", None)
    if surrogate is not None and not isinstance(surrogate, nn.Module) and callable(surrogate):
        surrogate = surrogate()
    return predict, (surrogate if surrogate is not None else predict)


def labelled(data, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` ``(x [n, C, H, W], y [n])`` of a pyens dataset, any ``(x, y)`` indexable
    dataset, or a tuple ``(x, y)`` of tensors."""
    if isinstance(data, tuple):
        return data[0][:n], data[1][:n]
    images = getattr(data, "images", None)
    n = min(n, len(data))
    if images is not None:
        return images[:n], data.labels[:n]
    items = [data[i] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])


def _check_data(x, y) -> None:
    """The examples ``evaluate`` takes: float images ``[n, ...]`` (pixels in [0, 1]) on a real
    device and ``n >= 1`` integer labels ``[n]``; errors name ``data``."""
    from pyens.checks import integer_labels

    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"evaluate: data's images must be a floating-point tensor of pixels in [0, 1] "
                        f"(divide integer images by 255), got {getattr(x, 'dtype', type(x).__name__)}")
    integer_labels(y, "evaluate: data's labels")
    if x.dim() < 2 or len(x) == 0 or tuple(y.shape) != (len(x),):
        raise ValueError(f"evaluate: data must hold n >= 1 images [n, ...] and labels [n], got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.device.type == "meta" or y.device.type == "meta":
        raise ValueError("evaluate: data must hold values, got meta tensors")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("evaluate: data's images must be finite, got NaN or infinity")
    if bool((y < 0).any()):
        raise ValueError(f"evaluate: data's labels must be class indices >= 0, got {y.min().item()}")


def predict_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(-1)


def resolve_attacks(attacks, dataset: str | None = None, *, radii=None, **kwargs) -> list[AttackSpec]:
    """A preset name (:func:`pyens.eval.catalogue.preset_attacks`, at ``dataset``'s paper radii or
    ``radii``; ``kwargs``: its ``steps``, ``restarts``, ...) or a list of :class:`AttackSpec`."""
    if isinstance(attacks, str):
        if attacks not in PRESETS:
            raise ValueError(f"attacks must be one of {PRESETS} or a list of AttackSpec, got {attacks!r}")
        return preset_attacks(attacks, dataset, radii=radii, **kwargs)
    return list(attacks)


def _same(a: AttackResult, spec: AttackSpec, n: int) -> bool:
    """``a`` (possibly read back from JSON, where tuples became lists) is ``spec``'s result."""
    want = None if spec.n is None or spec.n >= n else spec.n
    have = None if a.attacked is None else int(a.attacked.sum())
    as_json = lambda p: json.loads(json.dumps(p))  # noqa: E731
    return a.name == spec.name and as_json(a.params) == as_json(spec.params) and want == have


def evaluate(model: nn.Module, data, *, attacks: list[AttackSpec] | str = DEFAULT_PRESET, n: int = 1000,
             batch_size: int = 250, device: str | torch.device = "auto", name: str = "model",
             dataset: str | None = None, eps: dict | tuple | None = None, progress: bool = True,
             surrogate: nn.Module | None = None, seed: int = 0, resume: RobustnessReport | None = None,
             on_result: Callable[[RobustnessReport], None] | None = None) -> RobustnessReport:
    """Evaluate ``model`` on the first ``n`` examples of ``data`` under ``attacks``.

    Args:
        model: a classifier ``[B, C, H, W] -> [B, K]`` in pixel space, a MIMO or vanilla
            ensemble (attacked through its averaged output), or a model with a differentiable
            ``surrogate`` (DML ensembles); see :func:`targets`.
        data: a pyens dataset (or any ``(x, y)`` indexable dataset), or a tuple ``(x, y)``.
        attacks: a list of :class:`AttackSpec`, or a preset of :func:`pyens.eval.catalogue`:
            ``"pgd+apgd"`` (the default, as ``pyens eval``'s: PGD linf / l2 / l1 with 50 steps,
            and AutoAttack's APGD-CE and APGD-T for linf and l2), ``"pgd"``, ``"quick"`` (the
            whole catalogue cut to CPU size, every cut labelled) or ``"paper"`` (the whole
            catalogue at the papers' settings: hours on a CPU).
        n: number of examples (the papers use the first 1000 test images).
        batch_size: examples per attack batch.
        device: where the model and the attacks run: ``"auto"`` (CUDA when visible), ``"cpu"``,
            ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        dataset: whose paper radii a preset attacks at (``"mnist"``, ``"cifar10"``,
            ``"resisc45"``); default: ``data.name`` of a pyens dataset.
        eps: the radii instead, ``{"linf": 8/255, "l2": 0.5, "l1": 12}`` (pixel units; norms left
            out take ``dataset``'s). With a preset and data of unknown origin (a tuple
            ``(x, y)``), one of ``dataset`` and ``eps`` is needed: the radii are never guessed.
        surrogate: the differentiable classifier for gradient attacks (default: see :func:`targets`).
        seed: every attack batch starts from ``torch.manual_seed(seed + batch index)``.
        resume: an earlier report of the same model and examples: its attacks with the same
            label, parameters and example count are kept instead of being run again.
        on_result: called with the report so far after each attack (e.g. to save it).

    Returns:
        A :class:`RobustnessReport` with per-example results (and per-example distances).
        An attack succeeds on an example only if the model misclassifies its output AND the
        output lies within the spec's radius (minimum-norm attacks are judged this way).
        An AutoAttack row is followed by one row per sub-attack, whose union it is, and a
        randomized model gets AutoAttack's rand version (:mod:`pyens.eval.autoattack`).
        ``meta`` records the library versions, the example indices and the seed.
    """
    for arg, v in (("n", n), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"evaluate: {arg} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"evaluate: {arg} must be >= 1, got {v}")
    from pyens.training.distributed import resolve_device

    if isinstance(data, tuple) and len(data) != 2:
        raise ValueError(f"evaluate: data as a tuple must be (x, y), got a tuple of {len(data)}")
    x_all, y_all = labelled(data, n)
    _check_data(x_all, y_all)
    ds_name = dataset or getattr(data, "name", None)
    if isinstance(attacks, str) and ds_name is None and eps is None:
        raise ValueError(f"evaluate: data of shape {tuple(x_all.shape[1:])} is not a pyens dataset, and "
                         f"{NO_RADII}")
    if eps is not None and not isinstance(attacks, str):
        raise ValueError("evaluate: eps= sets the radii of a preset; a list of AttackSpec carries its own")
    specs = resolve_attacks(attacks, ds_name, radii=eps)
    device = resolve_device(device, "device")
    predict, attack_model = targets(model, surrogate)
    predict, attack_model = predict.to(device).eval(), attack_model.to(device).eval()
    # A random model's AutoAttack is the rand version (EOT); judged on a few of the examples.
    specs, randomized = for_randomized(specs, attack_model, x_all[:8].to(device))
    count = len(x_all)
    done = {a.name: a for a in (resume.attacks if resume is not None and resume.n == count else [])}
    todo = [s for s in specs if not (s.name in done and _same(done[s.name], s, count))]
    run_ids = {id(s) for s in todo}
    bar = None
    if progress:
        from pyens.progress import progress as progress_display

        batches = lambda m: (m + batch_size - 1) // batch_size  # noqa: E731
        total = batches(count) + sum(batches(min(s.n or count, count)) for s in todo)
        bar = progress_display(total, f"eval {name}", unit="batch")  # a bar on a terminal, else lines

    def batched(fn, m: int) -> list[torch.Tensor]:
        outs = []
        for b, i in enumerate(range(0, m, batch_size)):
            torch.manual_seed(seed + b)
            x, y = x_all[i:min(i + batch_size, m)].to(device), y_all[i:min(i + batch_size, m)].to(device)
            outs.append([t.cpu() for t in fn(x, y)])
            if bar is not None:
                bar.update(1)
        return [torch.cat(parts) for parts in zip(*outs)]

    meta = {"dataset": ds_name, "n": count, "device": str(device), "torch": torch.__version__, "seed": seed,
            "versions": library_versions(), "examples": list(range(count)), "randomized": randomized}
    if eps is not None:
        from pyens.eval.catalogue import NORMS, resolve_radii

        meta["radii"] = dict(zip(NORMS, resolve_radii(ds_name, eps)))
    report = RobustnessReport(name, torch.zeros(count, dtype=torch.bool), [], meta)
    try:
        (report.clean,) = batched(lambda x, y: [predict_labels(predict, x) == y], count)
        results = {s.name: done[s.name] for s in specs if id(s) not in run_ids}  # reused, saved from the start
        subrows = {s.name: [a for a in done.values() if a.parent == s.name] for s in specs if id(s) not in run_ids}

        def ordered() -> list[AttackResult]:  # each attack, then its sub-attack rows (AutoAttack's)
            return [r for s in specs if s.name in results for r in [results[s.name], *subrows.get(s.name, [])]]
        for spec in specs:
            if id(spec) not in run_ids:
                continue
            if bar is not None:
                bar.set_postfix_str(spec.name)
            atk = spec.make(attack_model if spec.kind == "white-box" else predict)
            m = min(spec.n or count, count)

            def run(x, y, atk=atk, spec=spec):
                x_adv = atk(x, y)
                if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
                    raise ValueError(f"attack {spec.name!r} returned {getattr(x_adv, 'shape', type(x_adv))}, "
                                     f"expected x's shape {tuple(x.shape)}")
                wrong = predict_labels(predict, x_adv) != y
                if spec.norm is None:
                    return [~wrong, torch.where(wrong, 0.0, torch.inf)]
                dist = lp_norm((x_adv - x).float(), spec.norm)
                inside = torch.ones_like(wrong) if spec.eps is None else dist <= spec.eps * (1 + EPS_RTOL) + EPS_ATOL
                # AutoAttack (AutoAttackDetail) says which of its sub-attacks made each output.
                extra = [atk.broken_by] if getattr(atk, "broken_by", None) is not None else []
                return [~(wrong & inside), torch.where(wrong, dist, torch.inf), *extra]

            t0 = time.perf_counter()
            correct, dist, *extra = batched(run, m)
            attacked = None
            if m < count:  # the rest were never attacked: correct (robust) by convention, distance inf
                attacked = torch.arange(count) < m
                correct = torch.cat([correct, torch.ones(count - m, dtype=torch.bool)])
                dist = torch.cat([dist, torch.full((count - m,), torch.inf)])
            results[spec.name] = AttackResult(spec.name, spec.group, correct, spec.params, time.perf_counter() - t0,
                                              spec.kind, spec.norm, spec.eps, dist, attacked, spec.note, spec.key)
            if extra:
                broken_by = torch.cat([extra[0], torch.full((count - m,), -1, dtype=torch.int64)])
                subrows[spec.name] = sub_results(results[spec.name], broken_by, atk.sub_attacks, atk.sub_params)
            report.attacks = ordered()
            if on_result is not None:
                on_result(report)
        report.attacks = ordered()
    finally:
        if bar is not None:
            bar.close()
    return report
