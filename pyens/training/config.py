"""Training configuration: one dataclass, TOML files in ``configs/``, the papers' presets.

A config names everything a run needs, so that a run directory's ``config.toml`` alone
rebuilds the model for evaluation and resumes training. Unset attack parameters take the
papers' values for the dataset (MAT paper, Appendix C): MNIST eps (linf, l2, l1) =
(0.3, 2.0, 10), alpha = (0.01, 0.1, 0.8); CIFAR-10 eps = (0.03, 0.5, 12), alpha =
(0.003, 0.02, 1.0).
"""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from pyens.checks import choice_arg, positive_int, probability, real_arg

from pyens.papers import NORMS, PAPER_ALPHA, PAPER_EPS  # noqa: F401  (re-exported: configs' radii)

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("triangular", "three_phase", "constant")
OUTER_LOSSES = ("max", "sum")
MSD_SELECTS = ("example", "batch")
DEVICES_HINT = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def _flag(default, kind: str, help: str):
    """A field that ``pyens train`` exposes as ``--NAME``: ``kind`` says how the command line
    spells it (``str``, ``int``, ``float``, ``bool``, ``csv_str``, ``csv_int``, ``per_norm``),
    ``help`` is its help text (``{placeholders}`` are filled in by the CLI: the choices)."""
    return field(default=default, metadata={"cli": kind, "help": help})


def cli_fields() -> list[dataclasses.Field]:
    """The fields of :class:`TrainConfig` that ``pyens train`` has a flag for, in order."""
    return [f for f in fields(TrainConfig) if "cli" in f.metadata]


@dataclass
class TrainConfig:
    """Everything one training run needs.

    Attributes (units: pixels in [0, 1]; epochs; optimizer steps):
        method: a name from :data:`pyens.training.METHODS`.
        dataset, data_dir: ``"mnist"`` (embedded when ``data_dir`` is empty), ``"cifar10"``,
            ``"resisc45"``.
        model: backbone name (``small_cnn``, ``lenet``, ``resnet18``, ``resnet50``).
        members: M, the sub-models of a MIMO / vanilla ensemble (or the perturbation types of
            ``avg``, ``max``, ``msd``: one per norm).
        norms, eps, alpha: per-member attack of the inner maximisation; empty ``norms`` =
            the method's default (``("l1", "l2", "linf")``, or ``("linf",)`` for ``at`` and
            ``mat_same``); ``eps``/``alpha``: one value per member (in the order of
            ``norms``), or a table ``{norm: value}`` (what config files use, so one file serves
            every method; ``--eps linf=0.3,l2=2,l1=10`` on the command line); missing = the
            paper's value for the dataset and norm. A single value is allowed only when every
            member has the same norm (one radius for linf, l2 and l1 is never meant).
        steps: K, PGD steps of the inner maximisation; ``k``: l1 sparsity of the step.
        k_range: ``[lo, hi]``: draw the l1 sparsity from ``lo..hi`` at every inner step
            instead of ``k`` (``msd``, ``mat_msd``; the MAT authors' code draws from 5..20);
            empty = fixed ``k``.
        random_start: start the inner PGD from a random point of the ball (``mat_msd``: slot
            m from member m's own ball, as in the MAT authors' code).
        msd_select: ``msd`` / ``mat_msd``: ``"example"`` (Maini et al.: the worst norm per
            example, best iterate over steps) or ``"batch"`` (the MAT authors' code: per
            member, the norm with the highest batch loss at each step; last iterate).
        eps_warmup: ramp the training radii (and step sizes) linearly from 0 to ``eps``
            over this fraction of training (0 = the full radius from the first step).
        outer: MAT's outer loss over members: ``"max"`` (Algorithm 1) or ``"sum"`` (eq. 4).
        input_repetition: MIMO methods: probability that an example fills every input slot
            (Havasi et al.'s rho); 1.0 = every slot the same batch (the MAT paper's
            Algorithm 1), 0.0 = independent shuffles (eq. 3).
        epochs, batch_size, optimizer, lr, momentum, weight_decay, schedule: Appendix C.1.
        train_size: use only the first ``train_size`` training examples (0 = all).
        eval_size: clean-accuracy examples checked at each epoch end (first of the test split).
        checkpoint_minutes: also checkpoint mid-epoch this often (wall clock).
        max_steps: stop after this many optimizer steps in total (0 = no limit; smoke tests).
    """

    method: str = _flag("mat", "str", "training method, one of {methods} (each explained below)")
    dataset: str = _flag("mnist", "str", "dataset, one of {datasets} (mnist is embedded; the others need --data-dir)")
    data_dir: str = _flag("", "str", "folder holding the dataset's files (empty: the embedded MNIST; nothing is "
                                     "downloaded)")
    model: str = _flag("small_cnn", "str", "backbone, one of {backbones}")
    members: int = _flag(3, "int", "M, sub-models of a MIMO or vanilla ensemble (count); attacked methods take one "
                                   "per norm from --norms")
    norms: tuple[str, ...] = _flag((), "csv_str", "comma-separated norms of the inner attack, one per member, from "
                                                  "linf, l2, l1 (empty: the method's, l1,l2,linf; at and mat_same: "
                                                  "linf)")
    eps: tuple[float, ...] | dict = _flag((), "per_norm", "attack radii in pixel units (pixels in [0, 1]), "
                                                          "{per_norm_eps} (missing: the paper's)")
    alpha: tuple[float, ...] | dict = _flag((), "per_norm", "PGD step sizes in pixel units per step, "
                                                            "{per_norm_alpha} (missing: the paper's)")
    steps: int = _flag(10, "int", "K, PGD steps of the inner maximisation (count)")
    k: int = _flag(20, "int", "l1 sparsity: coordinates an l1 step moves (count)")
    k_range: tuple[int, ...] = _flag((), "csv_int", "LO,HI: msd and mat_msd draw the l1 sparsity from LO..HI at "
                                                    "every step (empty: a fixed --k)")
    random_start: bool = _flag(False, "bool", "true or false: start the inner PGD at a random point of the ball")
    msd_select: str = _flag("example", "str", "msd and mat_msd: worst norm per example or per member over the batch, "
                                              "one of {msd_selects}")
    eps_warmup: float = _flag(0.0, "float", "fraction of training (0 to 1) over which radii and step sizes ramp up "
                                            "from 0")
    outer: str = _flag("sum", "str", "MAT's loss over members, one of {outer_losses} (max: Algorithm 1; sum: eq. 4)")
    input_repetition: float = _flag(0.0, "float", "MIMO methods: probability (0 to 1) that an example fills every "
                                                  "input slot")
    epochs: int = _flag(5, "int", "passes over the training set (count)")
    batch_size: int = _flag(100, "int", "training examples per optimizer step (count; the global batch under "
                                        "torchrun)")
    optimizer: str = _flag("adam", "str", "one of {optimizers}")
    lr: float = _flag(1e-3, "float", "peak learning rate of the schedule")
    momentum: float = 0.9
    weight_decay: float = _flag(0.0, "float", "L2 weight-decay coefficient")
    schedule: str = _flag("triangular", "str", "learning-rate schedule over all steps, one of {schedules}")
    train_size: int = _flag(0, "int", "train on the first N training images (count; 0: all)")
    eval_size: int = 1000
    seed: int = _flag(0, "int", "random seed of the initialisation, batch order and attacks (int)")
    device: str = _flag("auto", "str", "where training runs: {devices}")
    out: str = _flag("", "str", "run directory (empty: runs/METHOD-DATASET-MODEL-seedSEED, then -2, -3, ... when "
                                "taken)")
    checkpoint_minutes: float = 10.0
    max_steps: int = _flag(0, "int", "stop after this many optimizer steps in all (count; 0: no limit); the run "
                                     "stays resumable")
    description: str = ""
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------------
    def resolved(self) -> TrainConfig:
        """A validated copy with per-member ``norms``/``eps``/``alpha`` filled in."""
        from pyens.training.methods import get_method

        cfg = dataclasses.replace(self)
        method = get_method(cfg.method)
        if cfg.dataset not in PAPER_EPS:
            raise ValueError(f"dataset must be one of {sorted(PAPER_EPS)}, got {cfg.dataset!r}")
        norms = tuple(cfg.norms) if not isinstance(cfg.norms, str) else (cfg.norms,)
        for p in norms:
            if p not in NORMS:
                raise ValueError(f"norms: each must be one of {NORMS}, got {p!r}")
        positive_int(cfg.members, "members")
        norms = method.member_norms(norms, cfg.members)
        cfg.norms = norms
        cfg.eps = _per_norm(cfg.eps, norms, PAPER_EPS[cfg.dataset], "eps")
        cfg.alpha = _per_norm(cfg.alpha, norms, PAPER_ALPHA[cfg.dataset], "alpha")
        cfg.members = method.members(norms, cfg.members)
        for name in ("steps", "k", "epochs", "batch_size"):
            positive_int(getattr(cfg, name), name)
        cfg.eps_warmup = probability(cfg.eps_warmup, "eps_warmup")
        for name in ("train_size", "max_steps"):
            if int(getattr(cfg, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
        choice_arg(cfg.optimizer, "optimizer", OPTIMIZERS)
        choice_arg(cfg.schedule, "schedule", SCHEDULES)
        choice_arg(cfg.outer, "outer", OUTER_LOSSES)
        choice_arg(cfg.msd_select, "msd_select", MSD_SELECTS)
        from pyens.attacks.msd import check_k_range

        cfg.k_range = tuple(check_k_range(tuple(cfg.k_range) if isinstance(cfg.k_range, list) else cfg.k_range,
                                          "k_range") or ())
        cfg.input_repetition = probability(cfg.input_repetition, "input_repetition")
        for name in ("lr", "weight_decay", "momentum"):
            v = float(getattr(cfg, name))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(cfg, name)!r}")
        if not (isinstance(cfg.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device)):
            raise ValueError(f"device must be {DEVICES_HINT}, got {cfg.device!r}")
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("norms", "eps", "alpha", "k_range"):
            d[key] = dict(d[key]) if isinstance(d[key], dict) else list(d[key])
        return d

    def to_toml(self) -> str:
        lines = []
        for key, value in self.to_dict().items():
            if key == "extra":
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        if self.extra:
            lines.append("\n[extra]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in self.extra.items()]
        return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _per_norm(values, norms, paper: dict, name: str) -> tuple[float, ...]:
    if isinstance(values, dict):  # {norm: value}: looked up per member, paper value if absent
        bad = sorted(set(values) - set(NORMS))
        if bad:
            raise ValueError(f"{name}: keys must be norms {NORMS}, got {bad}")
        values = tuple(values.get(p, paper[p]) for p in norms)
    if isinstance(values, (int, float)):
        values = (values,)
    values = tuple(real_arg(v, name) for v in values)
    if not values:
        return tuple(paper[p] for p in norms)
    if len(values) == 1 and len(set(norms)) > 1:
        # One number for radii of different norms (0.3 as linf, l2 and l1 radius) is never meant.
        raise ValueError(f"{name}: one value ({values[0]:g}) for members of different norms {norms}; give one "
                         f"per norm: {per_norm_syntax(name, norms, paper)}")
    if len(values) == 1:
        values = values * len(norms)
    if len(values) != len(norms):
        raise ValueError(f"{name}: give one value per norm {norms}, got {len(values)}; per norm: "
                         f"{per_norm_syntax(name, norms, paper)}")
    return values


def per_norm_syntax(name: str, norms, paper: dict) -> str:
    """How to give ``name`` per norm, in the config file's and the CLI's syntax (paper values)."""
    pairs = [(p, paper[p]) for p in dict.fromkeys(norms)]
    toml = ", ".join(f"{p} = {v:g}" for p, v in pairs)
    cli = ",".join(f"{p}={v:g}" for p, v in pairs)
    return f"{name} = {{ {toml} }} in a config, --{name} {cli} on the command line"


# ---------------------------------------------------------------------------------------------
# config files

def config_names() -> list[str]:
    """Names of the configs shipped with pyens (``configs/*.toml``)."""
    root = resources.files("pyens.configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_config(path_or_name: str | Path, **overrides) -> TrainConfig:
    """Read a TOML config (a path, or the name of a shipped config) and apply overrides."""
    p = Path(path_or_name)
    if p.suffix == ".toml" and p.exists():
        text = p.read_text()
    elif len(p.parts) > 1:  # a path, not a name: never fall back to a shipped config of that name
        raise FileNotFoundError(f"config: no file {str(path_or_name)!r}")
    else:
        name = p.name[:-5] if p.name.endswith(".toml") else str(path_or_name)
        f = resources.files("pyens.configs") / f"{name}.toml"
        if not f.is_file():
            raise FileNotFoundError(
                f"config: no file {str(path_or_name)!r} and no shipped config of that name; "
                f"shipped: {', '.join(config_names())}")
        text = f.read_text()
    data = tomllib.loads(text)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for key in ("eps", "alpha"):  # {norm: value} over the file's table: only the norms given change
        if isinstance(data.get(key), dict) and isinstance(overrides.get(key), dict):
            overrides[key] = {**data[key], **overrides[key]}
    return config_from_dict({**data, **overrides})


def config_from_dict(data: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config: unknown keys {unknown}; known: {sorted(known)}")
    data = dict(data)
    for key in ("norms", "eps", "alpha", "k_range"):
        if key in data and isinstance(data[key], list):
            data[key] = tuple(data[key])
    return TrainConfig(**data)
