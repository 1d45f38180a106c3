"""Threat models: the norms and radii an evaluation attacks at, and their named presets.

A threat model is ``{norm: radius}`` in pixel units (pixels in [0, 1]) over some of
``linf``, ``l2``, ``l1``; the attacks of the norms it leaves out are not run. It is given as
``--eps linf=8/255,l2=0.5`` (fractions allowed), as a named preset (``--threat
cifar10-leaderboard``; :data:`THREATS`, listed by ``pyens eval --list-threats``), or both (the
``--eps`` values replace the preset's).

Step sizes: PGD's step size follows its radius and step count, ``alpha = 2.5 eps / steps``
(Madry et al. 2018's rule; l1: ``max(10 eps / steps, eps / 20)``, since an l1 step moves
only ``alpha`` of mass on ``k`` coordinates): :func:`pyens.eval.catalogue.quick_alpha`, the
one rule pyens uses. The papers' own step sizes are kept at the papers' radii (``--attacks
paper``). APGD, FAB and Square set their own step sizes from the radius.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from pyens.eval.catalogue import NORMS, RADII


@dataclass(frozen=True)
class Threat:
    """A named threat model: ``radii`` ``{norm: eps}`` (pixel units), the ``dataset`` whose
    images it is meant for, and the ``source`` of the numbers."""

    name: str
    radii: dict
    dataset: str
    source: str


def _paper(dataset: str) -> dict:
    return dict(zip(NORMS, RADII[dataset]))


THREATS: dict[str, Threat] = {t.name: t for t in (
    Threat("mnist-paper", _paper("mnist"), "mnist",
           "MAT paper App. C = MSD (Maini et al. 2020, 'Adversarial robustness against the union of multiple "
           "perturbation models'): linf 0.3, l2 2, l1 10"),
    Threat("cifar10-paper", _paper("cifar10"), "cifar10",
           "MAT paper App. C = MSD (Maini et al. 2020): linf 0.03, l2 0.5, l1 12"),
    Threat("resisc45-paper", _paper("resisc45"), "resisc45",
           "no paper value: CIFAR-10's radii (pyens' configs)"),
    Threat("cifar10-leaderboard", {"linf": 8 / 255, "l2": 0.5}, "cifar10",
           "RobustBench CIFAR-10 Linf and L2 leaderboards (Croce et al. 2021): linf 8/255, l2 0.5"),
    Threat("cifar100-leaderboard", {"linf": 8 / 255}, "cifar100",
           "RobustBench CIFAR-100 Linf leaderboard (Croce et al. 2021): linf 8/255"),
    Threat("imagenet-leaderboard", {"linf": 4 / 255}, "imagenet",
           "RobustBench ImageNet Linf leaderboard (Croce et al. 2021): linf 4/255"),
)}


def parse_number(text: str, what: str = "value") -> float:
    """``"0.5"``, ``"8/255"`` or ``"1e-3"`` -> float; a ValueError naming ``what`` otherwise."""
    s = str(text).strip()
    try:
        if "/" in s:
            num, _, den = s.partition("/")
            return float(Fraction(num.strip()) / Fraction(den.strip()))
        return float(s)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{what}: expected a number or a fraction such as 8/255, got {text!r}") from None


def threat_model(threat: str | None = None, eps: dict | None = None, dataset: str | None = None) -> dict:
    """The ``{norm: eps}`` an evaluation attacks at, in :data:`NORMS` order.

    Args:
        threat: a preset name of :data:`THREATS` (None: none).
        eps: ``{norm: eps}`` (``--eps``): with ``threat``, replaces its radii of those norms and
            adds the norms it lacks; alone, it is the whole threat model.
        dataset: with neither, the MAT paper's radii of this dataset (a pyens run's).

    Raises ValueError naming ``--threat`` / ``--eps`` when there is nothing to go on, or a
    radius is not a finite number > 0.
    """
    if threat is not None and threat not in THREATS:
        import difflib

        close = difflib.get_close_matches(threat, THREATS, n=1)
        raise ValueError(f"--threat must be one of {', '.join(THREATS)}, got {threat!r}"
                         + (f"; did you mean {close[0]!r}?" if close else "") + " (pyens eval --list-threats)")
    table: dict = {}
    if threat is not None:
        table.update(THREATS[threat].radii)
    elif not eps:
        if dataset not in RADII:
            raise ValueError(f"no radii for data {dataset!r}: give --threat (pyens eval --list-threats) or --eps "
                             "linf=8/255,l2=0.5,l1=12 (pixel units, pixels in [0, 1]); radii are never guessed")
        table.update(zip(NORMS, RADII[dataset]))
    for norm, v in (eps or {}).items():
        if norm not in NORMS:
            raise ValueError(f"--eps: norms are {', '.join(NORMS)}, got {norm!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
            raise ValueError(f"--eps: the {norm} radius must be a finite number > 0, got {v!r}")
        table[norm] = float(v)
    return {p: table[p] for p in NORMS if p in table}


def threat_specs(preset: str, threat: dict, dataset: str | None = None, *, steps: int | None = None,
                 restarts: int | None = None, alpha: dict | None = None, **kwargs):
    """The attacks of catalogue ``preset`` that belong to ``threat`` (``{norm: eps}``), at its radii.

    Attacks of norms outside ``threat`` are dropped (MSD, which needs all three balls, too).
    ``alpha``: ``{norm: step}`` overrides PGD's step size per norm (default: the rule of the
    module docstring). ``dataset``: kept for the paper's step sizes at the paper's radii.
    ``kwargs``: ``params``, ``subsets`` of :func:`pyens.eval.catalogue.catalogue`.
    """
    from pyens.eval.catalogue import CATALOGUE, preset_attacks, preset_params

    if not threat:
        raise ValueError("the threat model names no norm: give --eps NORM=EPS or --threat")
    # Norms left out get a stand-in radius so the catalogue can build its table; their attacks
    # are dropped below and never run.
    full = {p: threat.get(p, 1.0) for p in NORMS}
    paper = dataset in RADII and all(threat.get(p) == r for p, r in zip(NORMS, RADII[dataset]))
    keys = [k for k in preset_params(preset, dataset if paper else None, radii=full)
            if (CATALOGUE[k].norm in threat if CATALOGUE[k].norm else set(threat) == set(NORMS))]
    params = {key: dict(p) for key, p in (kwargs.pop("params", None) or {}).items()}
    for norm, a in (alpha or {}).items():
        if norm not in NORMS:
            raise ValueError(f"--alpha: norms are {', '.join(NORMS)}, got {norm!r}")
        if f"pgd_{norm}" not in keys:
            raise ValueError(f"--alpha {norm}: the threat model has no {norm} radius")
        params[f"pgd_{norm}"] = {**params.get(f"pgd_{norm}", {}), "alpha": float(a)}
    # The paper's radii of a known dataset keep the paper's step sizes (dataset=); others take the rule.
    return preset_attacks(preset, dataset if paper else None, radii=None if paper else full, steps=steps,
                          restarts=restarts, only=keys, params=params, **kwargs)


def list_threats() -> str:
    """The presets, one per line: name, radii, source (``pyens eval --list-threats``)."""
    width = max(map(len, THREATS))
    lines = []
    for t in THREATS.values():
        radii = ", ".join(f"{p} {_frac(v)}" for p, v in t.radii.items())
        lines.append(f"{t.name:{width}s}  {radii:28s}  {t.source}")
    return "\n".join(lines)


def _frac(v: float) -> str:
    """``0.0313...`` -> ``8/255`` when it is one; else ``%g``."""
    f = Fraction(v).limit_denominator(255)
    return f"{f.numerator}/{f.denominator}" if f.denominator in (255,) and abs(float(f) - v) < 1e-12 else f"{v:g}"
