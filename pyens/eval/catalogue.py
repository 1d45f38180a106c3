"""The attack catalogue of the MAT paper's Tables 4-5, with its parameters as presets.

Every entry is an :class:`AttackSpec`: a row label, the worst case it joins, the norm and
radius success is judged at, whether it needs gradients (``"white-box"``: given the model's
differentiable classifier or surrogate) or only decisions (``"black-box"``: given the
predicting model), and a factory ``make(model) -> attack(x, y) -> x_adv``.

=================  =====  ==========  ==================================================
key                group  kind        implementation (used as it is; adapters only)
=================  =====  ==========  ==================================================
pgd_linf/l2/l1     norm   white-box   :class:`pyens.attacks.PGD` (fused lp step)
hsj                linf   black-box   foolbox ``HopSkipJumpAttack`` (linf constraint)
autoattack_linf    linf   white-box   torchattacks ``AutoAttack``, one row per sub-attack below it
cw_l2              l2     white-box   foolbox ``L2CarliniWagnerAttack`` (binary search on c)
boundary           l2     black-box   foolbox ``BoundaryAttack``
autoattack_l2      l2     white-box   torchattacks ``AutoAttack`` (as autoattack_linf)
salt_pepper        l1     black-box   foolbox ``SaltAndPepperNoiseAttack``
ead_l1             l1     white-box   foolbox ``EADAttack`` (L1 decision rule)
msd                other  white-box   :class:`pyens.attacks.MSD` (worst of 3 steps)
apgd_ce_linf/l2    norm   white-box   torchattacks ``APGD`` (loss ``ce``), AutoAttack's first
apgd_t_linf/l2     norm   white-box   torchattacks ``APGDT`` (targeted DLR, 9 targets)
=================  =====  ==========  ==================================================

Minimum-norm attacks (CW, EAD, HSJ, Boundary, salt & pepper) succeed on an example only if
their adversarial example lies within the radius (``evaluate`` checks every attack's
distance), and their per-example distances give the distortion-accuracy curves.

Presets: ``"pgd+apgd"`` (the main job's table: PGD linf / l2 / l1 as in ``"pgd"``, plus
AutoAttack's two gradient attacks APGD-CE and APGD-T at 100 steps for linf and l2, from
torchattacks; PGD from ``delta = 0`` overstates the robustness of adversarially trained
models, and APGD's step-size schedule and DLR loss close most of that gap), ``"paper"`` (App. C.2: PGD 200 steps, l1 k = 20, 10 restarts, the training step
sizes; the other attacks at their original authors' settings, which are the libraries'
defaults unless said otherwise), ``"quick"`` (the same catalogue cut to CPU size; every
difference from ``"paper"`` is written into the spec's ``note`` and so into the report) and
``"pgd"`` (PGD linf / l2 / l1 only) and ``"autoattack"`` (AutoAttack's standard version for linf
and l2, the protocol of the RobustBench leaderboards).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pyens.checks import choice_arg, positive_int
from pyens.papers import NORMS, RADII  # per dataset: (linf, l2, l1), MAT paper App. C
from pyens.papers import PAPER_ALPHA_TRIPLES as PAPER_ALPHA  # the paper's PGD steps, same order

PRESETS = ("paper", "quick", "pgd", "pgd+apgd", "autoattack")
AUTOATTACK_KEYS = ("autoattack_linf", "autoattack_l2")
APGD_KEYS = ("apgd_ce_linf", "apgd_t_linf", "apgd_ce_l2", "apgd_t_l2")
# Attacks that minimise the distortion: their per-example distances are worth a curve.
MINIMUM_NORM = ("hsj", "cw_l2", "boundary", "salt_pepper", "ead_l1")


@dataclass
class AttackSpec:
    """An attack to evaluate.

    Attributes:
        name: row label. group: ``"linf" | "l2" | "l1" | "other"``.
        make: ``make(model) -> attack``, ``attack(x [B, C, H, W], y [B]) -> x_adv`` for a
            classifier ``model: [B, C, H, W] -> [B, K]`` in pixel space.
        params: its parameters (kept in the report). norm / eps: where success is judged
            (``None``: no radius check, e.g. MSD's union of balls). kind: ``"white-box"`` or
            ``"black-box"``. n: run on the first ``n`` examples only (``None``: all).
        note: how it differs from the paper's preset. key: its catalogue key.
    """

    name: str
    group: str
    make: Callable[[nn.Module], Callable]
    params: dict = field(default_factory=dict)
    norm: str | None = None
    eps: float | None = None
    kind: str = "white-box"
    n: int | None = None
    note: str = ""
    key: str = ""


NO_RADII = ("the attack radii depend on the data: pass dataset= (one of 'mnist', 'cifar10', 'resisc45': the "
            "papers' radii) or the radii themselves, eps={'linf': 8/255, 'l2': 0.5, 'l1': 12} (pixel units, "
            "pixels in [0, 1])")


def resolve_radii(dataset: str | None = None, radii=None) -> tuple[float, float, float]:
    """The ``(linf, l2, l1)`` radii attacks are run and judged at.

    ``radii``: ``{norm: value}`` (norms it leaves out take ``dataset``'s paper radius) or a
    ``(linf, l2, l1)`` triple; without it, ``dataset``'s paper radii (:data:`RADII`). Neither:
    a ValueError, never MNIST's radii by default.
    """
    if dataset is not None and dataset not in RADII:
        raise ValueError(f"dataset must be one of {sorted(RADII)}, got {dataset!r}")
    if radii is None:
        if dataset is None:
            raise ValueError(NO_RADII)
        return RADII[dataset]
    if isinstance(radii, dict):
        bad = sorted(set(radii) - set(NORMS))
        if bad:
            raise ValueError(f"eps: keys must be norms {NORMS}, got {bad}")
        table = {**(dict(zip(NORMS, RADII[dataset])) if dataset else {}), **radii}
        missing = [p for p in NORMS if p not in table]
        if missing:
            raise ValueError(f"eps: no radius for {missing}; give every norm's ({NORMS}), or dataset= for the "
                             "papers' radii of the norms left out")
        values = tuple(table[p] for p in NORMS)
    else:
        values = tuple(radii)
        if len(values) != len(NORMS):
            raise ValueError(f"eps: give {{norm: radius}} or one radius per norm {NORMS}, got {radii!r}")
    out = []
    for p, v in zip(NORMS, values):
        try:
            v = float(v)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"eps: the {p} radius must be a finite number > 0, got {v!r}") from None
        if not (v > 0 and v != float("inf")):
            raise ValueError(f"eps: the {p} radius must be finite and > 0, got {v}")
        out.append(v)
    return tuple(out)


def _radii(dataset: str | None, radii=None) -> tuple[float, float, float]:
    return resolve_radii(dataset, radii)


def quick_alpha(norm: str, eps: float, steps: int) -> float:
    """PGD step size for a short run: ``2.5 eps / steps`` (l1: ``10 eps / steps``, at least
    ``eps / 20``, since an l1 step moves only ``alpha`` of mass on k coordinates)."""
    return 2.5 * eps / steps if norm != "l1" else max(10 * eps / steps, eps / 20)


def _pgd_name(norm: str, eps: float, steps: int, restarts: int = 1) -> str:
    more = f", {restarts} restarts" if restarts > 1 else ""
    return f"PGD {norm} (eps {eps:g}, {steps} steps{more})"


def pgd_specs(dataset: str | None = None, *, radii=None, steps: int = 50, k: int = 20, restarts: int = 1,
              random_start: bool | None = None,
              alpha: tuple[float, float, float] | None = None) -> list[AttackSpec]:
    """PGD linf / l2 / l1 at ``radii`` (see :func:`resolve_radii`: ``{norm: value}``, or the
    paper's radii of ``dataset``; one of the two is needed); ``alpha`` per norm (default
    :func:`quick_alpha`).

    ``random_start`` defaults to ``restarts > 1``: restarts from ``delta = 0`` would all be the
    same run (``pyens eval --restarts 5`` then means five random starts).
    """
    from pyens.attacks import PGD

    if random_start is None:
        random_start = restarts > 1

    out = []
    for i, (norm, eps) in enumerate(zip(NORMS, _radii(dataset, radii))):
        a = quick_alpha(norm, eps, steps) if alpha is None else alpha[i]
        params = dict(norm=norm, eps=eps, alpha=a, steps=steps, k=k, restarts=restarts, random_start=random_start)
        out.append(AttackSpec(_pgd_name(norm, eps, steps, restarts), norm, lambda model, p=params: PGD(model, **p),
                              params, norm, eps, key=f"pgd_{norm}"))
    return out


# ---------------------------------------------------------------------------------------------
# adapters: the libraries' attacks as they are, behind ``attack(x, y) -> x_adv``

def count_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The number of classes ``model`` scores: its output width on one example of ``x``."""
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])


class TorchattacksAttack:
    """``torchattacks.<name>(model, **kwargs)(x, y)``; ``n_classes`` is read from the model
    when the attack takes it (AutoAttack)."""

    def __init__(self, model: nn.Module, name: str, **kwargs):
        self.model, self.name, self.kwargs = model, name, kwargs

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torchattacks

        kwargs = dict(self.kwargs)
        if self.name == "AutoAttack":
            kwargs.setdefault("n_classes", count_classes(self.model, x))
        return getattr(torchattacks, self.name)(self.model, **kwargs)(x, y).detach()


class CWLadder:
    """Carlini-Wagner l2 (torchattacks ``CW``, as it is) run once per constant ``c``; per
    example the smallest-l2 adversarial example over the runs is kept. torchattacks' CW
    takes one fixed ``c``; the ladder stands in for the original's binary search over c.

    Not the catalogue's CW: torchattacks' CW stops the whole batch as soon as the batch-summed
    cost rises at a check (every ``steps // 10`` steps), and it maps pixels at exactly 0 or 1
    to ``atanh(±1) = ±inf``, where they can never move. On the quick MNIST standard model
    (first 100 test images, 100 steps) it left 61-80% robust at l2 = 2 where foolbox's
    ``L2CarliniWagnerAttack`` (per-example binary search and early abort) left 13% and PGD 10%.
    """

    def __init__(self, model: nn.Module, *, c: Iterable[float] = (1.0,), **kwargs):
        self.model, self.c, self.kwargs = model, tuple(c), kwargs

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torchattacks

        best = x.clone()
        best_d = torch.full((len(x),), float("inf"), device=x.device)
        for c in self.c:
            adv = torchattacks.CW(self.model, c=c, **self.kwargs)(x, y).detach()
            with torch.no_grad():
                wrong = self.model(adv).argmax(1) != y
            d = (adv - x).flatten(1).norm(dim=1)
            better = wrong & (d < best_d)
            best[better], best_d[better] = adv[better], d[better]
        return best


class FoolboxAttack:
    """``foolbox.attacks.<name>(**kwargs)`` on ``foolbox.PyTorchModel(model, bounds=box)``,
    run unbounded (``epsilons=None``): the raw adversarial examples are returned and the radius
    is judged by :func:`pyens.eval.evaluate`.

    ``starts=True`` (decision-based attacks that must start from an adversarial point:
    ``BoundaryAttack`` and ``HopSkipJumpAttack`` raise for the whole batch when their
    initialisation fails on one input): foolbox's own default initialisation (``LinearSearchBlendedUniformNoiseAttack``,
    50 steps) is run first, and the attack runs from it on the inputs where it succeeded; the
    others are returned unchanged (the attack failed on them).
    """

    def __init__(self, model: nn.Module, name: str, box: tuple[float, float] = (0.0, 1.0), starts: bool = False,
                 **kwargs):
        self.model, self.name, self.box, self.starts, self.kwargs = model, name, box, starts, kwargs

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import warnings

        import foolbox

        fmodel = foolbox.PyTorchModel(self.model, bounds=self.box, device=x.device)
        attack = getattr(foolbox.attacks, self.name)(**self.kwargs)
        with warnings.catch_warnings():  # e.g. HSJ's "failed to find an initial adversarial": judged per example
            warnings.simplefilter("ignore")
            if not self.starts:
                return attack(fmodel, x, y, epsilons=None)[0].detach()
            init = foolbox.attacks.LinearSearchBlendedUniformNoiseAttack(steps=50)
            start = init(fmodel, x, y, epsilons=None)[0].detach()
            with torch.no_grad():
                ok = self.model(start).argmax(-1) != y
            out = x.clone()
            if ok.any():
                out[ok] = attack(fmodel, x[ok], y[ok], epsilons=None, starting_points=start[ok])[0].detach()
        return out


# ---------------------------------------------------------------------------------------------
# the catalogue

@dataclass(frozen=True)
class Entry:
    """A catalogue attack: label, group, norm index (into the radii), kind and factory."""

    title: str
    group: str
    norm: str | None
    kind: str
    build: Callable  # (params, eps, radii) -> make(model)
    library: str


def _pgd(p, eps, radii):
    from pyens.attacks import PGD

    return lambda model: PGD(model, eps=eps, **p)


def _msd(p, eps, radii):
    from pyens.attacks import MSD

    return lambda model: MSD(model, eps=radii, **p)


def _ta(name, **fixed):
    def build(p, eps, radii):
        return lambda model: TorchattacksAttack(model, name, eps=eps, **fixed, **p)
    return build


def _aa(norm):
    def build(p, eps, radii):
        from pyens.eval.autoattack import AutoAttackDetail

        return lambda model: AutoAttackDetail(model, norm=norm, eps=eps, seed=0, **p)
    return build


def _fb(name, **fixed):
    return lambda p, eps, radii: (lambda model: FoolboxAttack(model, name, **fixed, **p))


CATALOGUE: dict[str, Entry] = {
    "pgd_linf": Entry("PGD linf", "linf", "linf", "white-box", _pgd, "pyens"),
    "hsj": Entry("HSJ linf", "linf", "linf", "black-box", _fb("HopSkipJumpAttack", constraint="linf", starts=True),
                 "foolbox"),
    "autoattack_linf": Entry("AutoAttack linf", "linf", "linf", "white-box", _aa("Linf"),
                             "torchattacks"),
    "pgd_l2": Entry("PGD l2", "l2", "l2", "white-box", _pgd, "pyens"),
    "cw_l2": Entry("CW l2", "l2", "l2", "white-box", _fb("L2CarliniWagnerAttack"), "foolbox"),
    "boundary": Entry("Boundary l2", "l2", "l2", "black-box", _fb("BoundaryAttack", starts=True), "foolbox"),
    "autoattack_l2": Entry("AutoAttack l2", "l2", "l2", "white-box", _aa("L2"),
                           "torchattacks"),
    "pgd_l1": Entry("PGD l1", "l1", "l1", "white-box", _pgd, "pyens"),
    "salt_pepper": Entry("Salt & pepper l1", "l1", "l1", "black-box", _fb("SaltAndPepperNoiseAttack"), "foolbox"),
    "ead_l1": Entry("EAD l1", "l1", "l1", "white-box", _fb("EADAttack", decision_rule="L1"), "foolbox"),
    "msd": Entry("MSD linf/l2/l1", "other", None, "white-box", _msd, "pyens"),
    # AutoAttack's gradient attacks on their own (the main job's table; not in Table 4).
    "apgd_ce_linf": Entry("APGD-CE linf", "linf", "linf", "white-box", _ta("APGD", norm="Linf", loss="ce", seed=0),
                          "torchattacks"),
    "apgd_t_linf": Entry("APGD-T linf", "linf", "linf", "white-box", _ta("APGDT", norm="Linf", seed=0),
                         "torchattacks"),
    "apgd_ce_l2": Entry("APGD-CE l2", "l2", "l2", "white-box", _ta("APGD", norm="L2", loss="ce", seed=0),
                        "torchattacks"),
    "apgd_t_l2": Entry("APGD-T l2", "l2", "l2", "white-box", _ta("APGDT", norm="L2", seed=0), "torchattacks"),
}


# The paper preset (App. C.2: PGD with 200 steps, l1 k = 20, the MSD evaluation's 10 random
# restarts and the training step sizes; the other attacks at their authors' settings, which are
# the libraries' defaults). PGD's and MSD's step sizes are filled in per dataset.
PAPER = {
    "pgd": dict(steps=200, k=20, restarts=10, random_start=True),
    "hsj": dict(steps=64, initial_gradient_eval_steps=100, max_gradient_eval_steps=10000, gamma=1.0),
    # AutoAttack as its authors run it: 100 iterations of APGD, APGD-T and FAB-T (torchattacks'
    # port defaults to 10), Square with 5000 queries.
    "autoattack_linf": dict(version="standard", steps=100),
    "cw_l2": dict(binary_search_steps=9, steps=10000, stepsize=0.01, confidence=0, initial_const=0.001,
                  abort_early=True),
    "boundary": dict(steps=25000, spherical_step=0.01, source_step=0.01, step_adaptation=1.5),
    "autoattack_l2": dict(version="standard", steps=100),
    "salt_pepper": dict(steps=1000),
    "ead_l1": dict(binary_search_steps=9, steps=1000, initial_stepsize=0.01, initial_const=0.001,
                   regularization=0.01, abort_early=True),
    "msd": dict(steps=200, k=20),
    # AutoAttack's standard version: 100 iterations, 1 restart each, APGD-T over 9 target classes.
    **{key: dict(steps=100, n_restarts=1) for key in APGD_KEYS},
}
# The quick preset: what changes from the paper's, to fit a CPU (50-step PGD, step sizes scaled).
QUICK = {
    "pgd": dict(steps=50, restarts=1, random_start=False),
    "hsj": dict(steps=10, max_gradient_eval_steps=1000),
    "cw_l2": dict(binary_search_steps=5, steps=100, stepsize=0.1),
    "boundary": dict(steps=5000),
    "ead_l1": dict(binary_search_steps=5, steps=300),
    "msd": dict(steps=50),
    "autoattack_linf": dict(steps=10),  # torchattacks' own default
    "autoattack_l2": dict(steps=10),
}


def preset_params(preset: str, dataset: str | None = None, *, radii=None) -> dict[str, dict]:
    """Catalogue key -> the preset's parameters for ``dataset`` or ``radii`` (see the module
    docstring and :func:`resolve_radii`). ``"paper"`` takes the paper's step sizes at the paper's
    radii of ``dataset``, and :func:`quick_alpha` at its 200 steps at other radii."""
    choice_arg(preset, "preset", PRESETS)
    radii = _radii(dataset, radii)
    changes = {} if preset in ("paper", "autoattack") else QUICK
    table = {k: {**v, **changes.get(k, {})} for k, v in PAPER.items()}
    steps = table["pgd"]["steps"]
    paper_radii = dataset is not None and radii == RADII[dataset]
    alpha = PAPER_ALPHA[dataset] if preset == "paper" and paper_radii else tuple(quick_alpha(p, e, steps)
                                                                                   for p, e in zip(NORMS, radii))
    out = {f"pgd_{p}": dict(norm=p, alpha=a, **table["pgd"]) for p, a in zip(NORMS, alpha)}
    if preset == "pgd":
        return out
    if preset == "pgd+apgd":
        return {**out, **{k: table[k] for k in APGD_KEYS}}
    if preset == "autoattack":  # the leaderboards' protocol: AutoAttack alone, per norm (no l1 version)
        return {k: table[k] for k in AUTOATTACK_KEYS}
    out.update({k: v for k, v in table.items() if k not in ("pgd", *APGD_KEYS)})
    out["msd"] = dict(alpha=alpha, **table["msd"])
    return {k: out[k] for k in CATALOGUE if k in out}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def differences(key: str, params: dict, dataset: str | None, radii=None) -> str:
    """``"steps 50 (paper 200), ..."``: how ``params`` differ from the paper's preset."""
    paper = preset_params("paper", dataset, radii=radii).get(key) or PAPER[key]
    diffs = [f"{k} {_fmt(v)} (paper {_fmt(paper.get(k))})" for k, v in params.items()
             if _fmt(v) != _fmt(paper.get(k))]
    return ", ".join(diffs)


def describe(params: dict) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in params.items() if k != "norm")


def catalogue(preset: str = "paper", dataset: str | None = None, *, radii=None, only: Iterable[str] | None = None,
              params: dict[str, dict] | None = None, subsets: dict[str, int] | None = None) -> list[AttackSpec]:
    """The catalogue's attacks with a preset's parameters, in the Table 4 order.

    Args:
        preset: ``"paper"``, ``"quick"``, ``"pgd"`` or ``"pgd+apgd"``.
        dataset: sets the radii (the paper's for that dataset) and the paper's step sizes.
        radii: the radii instead, ``{norm: value}`` or ``(linf, l2, l1)`` (pixel units); one of
            ``dataset`` and ``radii`` is needed (:func:`resolve_radii`).
        only: catalogue keys to keep (default: all the preset has).
        params: per-key parameter overrides, e.g. ``{"hsj": {"steps": 8}}``.
        subsets: per-key example counts: run that attack on the first n examples only.

    Every difference from the ``"paper"`` preset (parameters, subsets) is written into the
    spec's ``note``, which the report prints beside the attack.
    """
    given = radii
    table = preset_params(preset, dataset, radii=given)
    radii = _radii(dataset, given)
    params, subsets = params or {}, subsets or {}
    keys = list(table) if only is None else list(only)
    for key in [*keys, *params, *subsets]:
        if key not in table:
            raise ValueError(f"attack {key!r} is not in the {preset!r} preset; it has {sorted(table)}")
    out = []
    for key in keys:
        entry = CATALOGUE[key]
        p = {**table[key], **params.get(key, {})}
        eps = radii[NORMS.index(entry.norm)] if entry.norm else None
        note = differences(key, p, dataset, radii)
        if key in subsets:
            note = ", ".join(filter(None, [f"first {subsets[key]} examples only", note]))
        if key.startswith("pgd_"):
            name = _pgd_name(entry.norm, eps, p["steps"], p.get("restarts", 1))
        elif key == "msd" or key in APGD_KEYS:
            name = f"{entry.title} ({'eps ' + format(eps, 'g') + ', ' if eps else ''}{p['steps']} steps)"
        else:
            name = f"{entry.title} (eps {eps:g})"
        shown = p if eps is None else {"eps": eps, **p}
        out.append(AttackSpec(name, entry.group, entry.build(p, eps, radii), shown, entry.norm, eps,
                              entry.kind, subsets.get(key), note, key))
    return out


DEFAULT_PRESET = "pgd+apgd"  # pyens.evaluate's and pyens eval's default
PGD_PRESETS = ("pgd", "pgd+apgd")


def preset_attacks(preset: str = DEFAULT_PRESET, dataset: str | None = None, *, radii=None,
                   steps: int | None = None, restarts: int | None = None, **kwargs) -> list[AttackSpec]:
    """The attacks of a preset, as ``pyens eval --attacks PRESET`` and
    ``pyens.evaluate(attacks=PRESET)`` both run them (one function, so the two agree).

    Args:
        preset: one of :data:`PRESETS` (default ``"pgd+apgd"``: PGD linf / l2 / l1, 50 steps,
            plus AutoAttack's APGD-CE and APGD-T for linf and l2).
        dataset, radii: the radii (:func:`resolve_radii`).
        steps, restarts: PGD's steps and restarts (``pgd`` and ``pgd+apgd`` only; ``pyens eval
            --steps/--restarts``); the step size follows the steps (:func:`quick_alpha`) and
            restarts above 1 start at random points of the ball. Default: the preset's (50, 1).
        **kwargs: ``only``, ``params``, ``subsets`` of :func:`catalogue`.
    """
    params = {key: dict(p) for key, p in (kwargs.pop("params", None) or {}).items()}
    if steps is not None or restarts is not None:
        if preset not in PGD_PRESETS:
            raise ValueError(f"steps and restarts set PGD's in the {PGD_PRESETS} presets; the {preset!r} preset "
                             "sets its own (override them with params=)")
        for name, v in (("steps", steps), ("restarts", restarts)):
            if v is not None:
                positive_int(v, name)
        for norm, eps in zip(NORMS, _radii(dataset, radii)):
            change = {}
            if steps is not None:
                change.update(steps=steps, alpha=quick_alpha(norm, eps, steps))
            if restarts is not None:
                change.update(restarts=restarts, random_start=restarts > 1)
            params[f"pgd_{norm}"] = {**change, **params.get(f"pgd_{norm}", {})}
    return catalogue(preset, dataset, radii=radii, params=params, **kwargs)


# ---------------------------------------------------------------------------------------------
# the DML paper's attacks (pyens.eval.dml's tables): FGSM, PGD/BIM, CW, AutoAttack specs

def fgsm_spec(eps: float) -> AttackSpec:
    from pyens.attacks import FGSM

    return AttackSpec(f"FGSM (eps {eps:g})", "linf", lambda model: FGSM(model, eps=eps), dict(eps=eps), "linf", eps)


def pgd_spec(eps: float, steps: int, *, restarts: int = 1, random_start: bool = True, loss: str = "ce",
             label: str | None = None, surrogate: nn.Module | None = None) -> AttackSpec:
    """linf PGD with ``alpha = 2.5 eps / steps``; BIM is ``random_start=False``.

    ``surrogate``: attack this module instead of the one :func:`pyens.eval.evaluate` hands over.
    """
    from pyens.attacks import PGD

    params = dict(norm="linf", eps=eps, alpha=quick_alpha("linf", eps, steps), steps=steps, restarts=restarts,
                  random_start=random_start, loss=loss)
    kind = "PGD" if random_start else "BIM"
    more = f", {restarts} restarts" if restarts > 1 else ""
    name = label or f"{kind}-{steps} (eps {eps:g}{more})"
    return AttackSpec(name, "linf", lambda model: PGD(surrogate if surrogate is not None else model, **params),
                      params, "linf", eps)


class PositiveLogits(nn.Module):
    """``z - min_k z_k + 1``: the same logit differences (values and gradients), all logits >= 1.

    torchattacks' ``CW.f`` takes the best other logit as ``max((1 - onehot) * z)`` and the true
    one as ``max(onehot * z)``, so a masked-out entry counts as a logit of 0. With logits that
    are all negative (a DML's ``-d``) both maxima are 0, the classification term is identically 0
    and CW only shrinks the perturbation: it reports full robustness. The shift removes that
    without changing the CW objective (it depends on logit differences only).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return z - z.detach().amin(-1, keepdim=True) + 1


def cw_spec(c: float = 1.0, steps: int = 200, kappa: float = 0.0, lr: float = 0.01, *,
            shift: bool = True) -> AttackSpec:
    """Carlini-Wagner l2 at one constant (the paper's "CW gamma = 1"), unbounded: accuracy is
    the share of examples it finds no adversarial example for. ``shift``: run it on
    :class:`PositiveLogits` (``False``: as torchattacks runs it, for the honesty check)."""
    params = dict(c=c, kappa=kappa, steps=steps, lr=lr)
    wrap = PositiveLogits if shift else (lambda m: m)
    name = f"CW (c {c:g}, {steps} steps)" + ("" if shift else ", unshifted logits")
    return AttackSpec(name, "l2", lambda model: CWLadder(wrap(model), c=(c,), kappa=kappa, steps=steps, lr=lr),
                      {**params, "shift": shift}, "l2", None)


def cw_ladder_spec(cs: Sequence[float] = (1.0, 10.0, 100.0), steps: int = 200, lr: float = 0.01) -> AttackSpec:
    """CW-l2 once per constant in ``cs`` on :class:`PositiveLogits`, keeping the smallest
    adversarial example (unbounded)."""
    params = dict(c=tuple(cs), kappa=0.0, steps=steps, lr=lr)
    label = ", ".join(f"{c:g}" for c in cs)
    return AttackSpec(f"CW (c {label}, {steps} steps)", "l2", lambda model: CWLadder(PositiveLogits(model), **params),
                      params, "l2", None)


def autoattack_spec(eps: float, n: int | None = None) -> AttackSpec:
    """The catalogue's linf AutoAttack at ``eps`` (torchattacks' default steps): its sub-attacks
    get rows, and a randomized model (R-DML, AUG-DML) gets the ``rand`` version."""
    params = dict(version="standard")
    return AttackSpec(f"AutoAttack (eps {eps:g})", "linf", CATALOGUE["autoattack_linf"].build(params, eps, None),
                      {"eps": eps, **params}, "linf", eps, n=n, key="autoattack_linf")
