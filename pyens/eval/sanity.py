"""Sanity checks against false robustness (Carlini et al. 2019, "On evaluating adversarial
robustness", Sec. 5): what a correct evaluation of a model without gradient masking shows.

1. Robust accuracy does not increase with the radius (per norm, PGD radius curve).
2. Robust accuracy does not increase with the number of attack steps (per norm).
3. An unbounded attack (linf PGD over the whole box) reaches ~0% accuracy.
4. Black-box (decision-based) attacks are not stronger than the white-box attacks of the
   same norm, on the examples both ran on.
5. Transfer attacks (crafted on another member, or on a member for the ensemble) are not
   stronger than the white-box attack on the judged model itself.
6. Random noise of the same norm and radius is weaker than PGD.

Each check gives a :class:`Check`; a failed one is reported as possible gradient masking.
Tolerances: a difference counts only above ``max(tol, 3 / n)`` (two points by default, and
at least three examples), so sampling noise on few examples does not fire a check.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from pyens.eval.curves import Curves
from pyens.eval.results import RobustnessReport
from pyens.eval.transfer import TransferReport

TOL = 0.02
UNBOUNDED_MAX = 0.02
MASKING = "possible gradient masking"


@dataclass
class Check:
    """One sanity check. ``passed``: True / False, or None when it could not be run (missing
    data); ``detail`` says what was compared; ``violations`` lists what fired it; ``value`` is
    the measured quantity where there is one."""

    name: str
    passed: bool | None
    detail: str
    violations: list[str] = field(default_factory=list)
    value: float | None = None  # the measured quantity, where there is one (the unbounded attack's accuracy)

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "not run"
        return "pass" if self.passed else f"FAIL ({MASKING})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Check:
        return cls(**d)


def _tol(n: int, tol: float) -> float:
    return max(tol, 3 / max(n, 1))


def _increases(values: list[float], xs: list, tol: float, what: str, norm: str) -> list[str]:
    out, best = [], values[0]
    for i in range(1, len(values)):
        if values[i] > best + tol:
            out.append(f"{norm}: {100 * values[i]:.1f}% at {what} {xs[i]:g} > {100 * best:.1f}% at a smaller {what}")
        best = min(best, values[i])
    return out


def _monotone(curves: Curves | None, what: str, tol: float) -> Check:
    """Accuracy non-increasing along the radius (``what="eps"``) or steps (``"steps"``) curves."""
    name = f"accuracy non-increasing in {what}"
    if curves is None or not (curves.radius if what == "eps" else curves.steps):
        return Check(name, None, f"no {what} curves")
    table, xs = (curves.radius, "radii") if what == "eps" else (curves.steps, "steps")
    t = _tol(curves.n, tol)
    bad = [v for norm, c in table.items() for v in _increases(c["accuracy"], c[xs], t, what, norm)]
    grid = ", ".join(f"{norm} {[round(x, 4) for x in c[xs]]}" for norm, c in table.items())
    return Check(name, not bad, f"PGD along {what} ({grid}) on {curves.n} examples, tolerance {100 * t:.1f} points",
                 bad)


def monotone_in_radius(curves: Curves | None, tol: float = TOL) -> Check:
    return _monotone(curves, "eps", tol)


def monotone_in_steps(curves: Curves | None, tol: float = TOL) -> Check:
    return _monotone(curves, "steps", tol)


def unbounded_reaches_zero(curves: Curves | None, limit: float = UNBOUNDED_MAX) -> Check:
    name = "unbounded attack reaches ~0%"
    if curves is None or not curves.unbounded:
        return Check(name, None, "no unbounded attack run")
    u = curves.unbounded
    lim = max(limit, 3 / max(curves.n, 1))
    ok = u["accuracy"] <= lim
    return Check(name, ok, f"{u['norm']} PGD with eps {u['eps']:g} (the whole box), {u['steps']} steps, "
                 f"accuracy at most {100 * lim:.1f}%",
                 [] if ok else [f"{100 * u['accuracy']:.1f}% accuracy under an unbounded attack"], u["accuracy"])


def blackbox_not_stronger(report: RobustnessReport | None, tol: float = TOL) -> Check:
    name = "black-box attacks not stronger than white-box"
    if report is None:
        return Check(name, None, "no evaluation")
    bad, compared = [], []
    for group, names in report.groups().items():
        white = [a for a in report.attacks if a.name in names and a.kind == "white-box"]
        # A sub-attack row (AutoAttack's Square) is part of its parent's row: compared through it.
        for b in (a for a in report.attacks if a.name in names and a.kind == "black-box" and not a.parent):
            if not white:
                continue
            on = torch.ones_like(report.clean) if b.attacked is None else b.attacked
            m = max(int(on.sum()), 1)
            acc_b = int((report.robust(b.name) & on).sum()) / m
            acc_w = int((report.union([w.name for w in white]) & on).sum()) / m
            compared.append(b.name)
            if acc_b < acc_w - _tol(m, tol):
                bad.append(f"{b.name}: {100 * acc_b:.1f}% < {100 * acc_w:.1f}% under the {group} white-box attacks "
                           f"(on {m} examples)")
    if not compared:
        return Check(name, None, "no black-box attack with a white-box attack of the same norm")
    return Check(name, not bad, f"each of {', '.join(compared)} vs the union of the white-box attacks of its norm",
                 bad)


def transfer_not_stronger(transfers: list[TransferReport] | None, tol: float = TOL) -> Check:
    name = "transfer attacks not stronger than white-box"
    if not transfers:
        return Check(name, None, "no transfer tables (single model)")
    bad = []
    for r in transfers:
        c = r.counts()
        t = _tol(r.n, tol) * r.n
        for j, target in enumerate(r.targets):
            own = int(c[r.sources.index(target), j])
            for i, src in enumerate(r.sources):
                if src != target and int(c[i, j]) > own + t:
                    bad.append(f"{r.norm}: crafted on {src}, {target} errs on {int(c[i, j])} > {own} under its own "
                               "white-box attack")
    return Check(name, not bad, "N_ij <= N_jj for every source i and target j, every norm", bad)


def noise_weaker(curves: Curves | None, tol: float = TOL) -> Check:
    name = "random noise weaker than PGD"
    if curves is None or not curves.noise:
        return Check(name, None, "no noise runs")
    bad, t = [], _tol(curves.n, tol)
    for norm, z in curves.noise.items():
        rad = curves.radius.get(norm)
        if rad is None:
            continue
        pgd = rad["accuracy"][min(range(len(rad["radii"])), key=lambda i: abs(rad["radii"][i] - z["eps"]))]
        if z["accuracy"] < pgd - t:
            bad.append(f"{norm}: noise {100 * z['accuracy']:.1f}% < PGD {100 * pgd:.1f}% at eps {z['eps']:g}")
    return Check(name, not bad, f"{next(iter(curves.noise.values()))['draws']} uniform draws in the ball per example "
                 f"vs PGD at the same radius, on {curves.n} examples", bad)


def run_checks(report: RobustnessReport | None = None, curves: Curves | None = None,
               transfers: list[TransferReport] | None = None, *, tol: float = TOL) -> list[Check]:
    """All six checks on what was measured (a check without its data is "not run")."""
    return [monotone_in_radius(curves, tol), monotone_in_steps(curves, tol), unbounded_reaches_zero(curves),
            blackbox_not_stronger(report, tol), transfer_not_stronger(transfers, tol),
            noise_weaker(curves, tol)]


def flagged(checks: list[Check]) -> bool:
    """True if any check failed: the evaluation may be fooled by gradient masking."""
    return any(c.passed is False for c in checks)


def precision_agrees(acc32: float, acc_low: float, n: int, what: str, tol: float = TOL) -> Check:
    """The same attack on the model in float32 and under autocast (``what``: ``"PGD linf 0.3,
    20 steps, bf16"``): low precision can round gradients away (vanishing or quantised input
    gradients), so a robust accuracy higher there than in float32 (by more than ``max(tol,
    3 / n)``) is flagged."""
    t = _tol(n, tol)
    ok = acc_low <= acc32 + t
    return Check("low precision not more robust than float32", ok,
                 f"{what} on {n} examples: {100 * acc32:.1f}% in float32, {100 * acc_low:.1f}% in low precision, "
                 f"tolerance {100 * t:.1f} points",
                 [] if ok else [f"{100 * acc_low:.1f}% under low precision > {100 * acc32:.1f}% in float32"],
                 acc_low - acc32)
