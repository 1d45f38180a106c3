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

The DML paper's report (:mod:`pyens.eval.dml`) reads its own measurements with the same rule:
its distortion-accuracy curve (accuracy vs linf radius under FGSM, BIM-10, PGD-10 and a long
PGD; check 1 runs on it too) falls towards 0, FGSM is not stronger than PGD, BIM from the clean
input is not much weaker than PGD from a random start, more PGD steps do not gain much, no other
attack surrogate and no transfer attack from another model is much stronger than the attack
reported, the input gradient is rarely exactly zero, and CW at the fixed constant c = 1 is not
much weaker than CW over a ladder of constants or than CW on the raw logits.

Each check gives a :class:`Check`; a failed one is reported as :data:`MASKING_VERDICT`.
Tolerances, one rule for every check: a difference (or a rate) counts only above
``max(tol, 3 / n)`` on ``n`` examples (:func:`tolerance`), so sampling noise on few examples
does not fire a check. ``tol`` is :data:`TOL` (two points) where the two numbers should agree;
where a stronger or longer attack is expected to gain something (more steps, a random start,
the best of several surrogates, a ladder of CW constants), it is a named margin for that gain.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from pyens.eval.curves import Curves
from pyens.eval.results import RobustnessReport
from pyens.eval.transfer import TransferReport

TOL = 0.02
UNBOUNDED_MAX = 0.02
# The DML report's margins (accuracy points in [0, 1]): what a stronger attack may gain, and
# the accuracy its curve may keep at the largest radius (not the whole box, so not ~0).
LARGE_RADIUS_MAX = 0.10
RANDOM_START_GAIN = 0.10
MORE_STEPS_GAIN = 0.05
STRONGER_ATTACK_GAIN = 0.05
ZERO_GRADIENT_MAX = 0.01
MASKING_VERDICT = "possible gradient masking"
NO_MASKING_VERDICT = "no sign of gradient masking"


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
        return "pass" if self.passed else f"FAIL ({MASKING_VERDICT})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Check:
        return cls(**d)


def tolerance(n: int, tol: float = TOL) -> float:
    """The margin a difference (or rate) on ``n`` examples must exceed to count: ``max(tol, 3 / n)``."""
    return max(tol, 3 / max(n, 1))


def _increases(values: list[float], xs: list, tol: float, what: str, norm: str) -> list[str]:
    out, best = [], values[0]
    for i in range(1, len(values)):
        if values[i] > best + tol:
            out.append(f"{norm}: {100 * values[i]:.1f}% at {what} {xs[i]:g} > {100 * best:.1f}% at a smaller {what}")
        best = min(best, values[i])
    return out


def _monotone(curves: Curves | None, what: str, tol: float, attack: str = "PGD") -> Check:
    """Accuracy non-increasing along the radius (``what="eps"``) or steps (``"steps"``) curves of
    ``attack`` (the curves' keys: norms, or attacks when ``attack`` says so)."""
    name = f"accuracy non-increasing in {what}"
    if curves is None or not (curves.radius if what == "eps" else curves.steps):
        return Check(name, None, f"no {what} curves")
    table, xs = (curves.radius, "radii") if what == "eps" else (curves.steps, "steps")
    t = tolerance(curves.n, tol)
    bad = [v for norm, c in table.items() for v in _increases(c["accuracy"], c[xs], t, what, norm)]
    grid = ", ".join(f"{norm} {[round(x, 4) for x in c[xs]]}" for norm, c in table.items())
    return Check(name, not bad,
                 f"{attack} along {what} ({grid}) on {curves.n} examples, tolerance {100 * t:.1f} points", bad)


def monotone_in_radius(curves: Curves | None, tol: float = TOL, attack: str = "PGD") -> Check:
    return _monotone(curves, "eps", tol, attack)


def monotone_in_steps(curves: Curves | None, tol: float = TOL) -> Check:
    return _monotone(curves, "steps", tol)


def unbounded_reaches_zero(curves: Curves | None, limit: float = UNBOUNDED_MAX) -> Check:
    name = "unbounded attack reaches ~0%"
    if curves is None or not curves.unbounded:
        return Check(name, None, "no unbounded attack run")
    u = curves.unbounded
    lim = tolerance(curves.n, limit)
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
            if acc_b < acc_w - tolerance(m, tol):
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
        t = tolerance(r.n, tol) * r.n
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
    bad, t = [], tolerance(curves.n, tol)
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


def verdict(checks: list[Check]) -> str:
    """:data:`MASKING_VERDICT` if any of ``checks`` failed, else :data:`NO_MASKING_VERDICT`."""
    return MASKING_VERDICT if flagged(checks) else NO_MASKING_VERDICT


def precision_agrees(acc32: float, acc_low: float, n: int, what: str, tol: float = TOL) -> Check:
    """The same attack on the model in float32 and under autocast (``what``: ``"PGD linf 0.3,
    20 steps, bf16"``): low precision can round gradients away (vanishing or quantised input
    gradients), so a robust accuracy higher there than in float32 (by more than ``max(tol,
    3 / n)``) is flagged."""
    t = tolerance(n, tol)
    ok = acc_low <= acc32 + t
    return Check("low precision not more robust than float32", ok,
                 f"{what} on {n} examples: {100 * acc32:.1f}% in float32, {100 * acc_low:.1f}% in low precision, "
                 f"tolerance {100 * t:.1f} points",
                 [] if ok else [f"{100 * acc_low:.1f}% under low precision > {100 * acc32:.1f}% in float32"],
                 acc_low - acc32)


# ---------------------------------------------------------------------------------------------
# the DML report's checks: its distortion-accuracy curve ``curve`` is
# :func:`pyens.eval.dml.distortion_curve`'s ``{"eps": [...], "accuracy": {attack: [...]}, "long", "n"}``
# with the attacks "FGSM", "BIM-10", "PGD-10" and "PGD-long" (PGD with ``long`` steps).

NO_CURVE = "no distortion-accuracy curve"


def curve_label(curve: dict, attack: str) -> str:
    """How a curve's ``attack`` is printed: "PGD-long" with its number of steps (``curve["long"]``)."""
    return attack.replace("long", str(curve["long"]))


def falls_towards_zero(curve: dict | None, limit: float = LARGE_RADIUS_MAX) -> Check:
    """The strongest attack of ``curve`` leaves at most ``max(limit, 3 / n)`` at its largest radius."""
    name = "accuracy falls towards 0 at the largest radius"
    if curve is None:
        return Check(name, None, NO_CURVE)
    eps, lim = curve["eps"][-1], tolerance(curve["n"], limit)
    attack, acc = min(((a, values[-1]) for a, values in curve["accuracy"].items()), key=lambda t: t[1])
    attack = curve_label(curve, attack)
    ok = acc <= lim
    return Check(name, ok, f"the strongest attack at eps {eps:g} ({attack}) on {curve['n']} examples, accuracy at "
                 f"most {100 * lim:.1f}%",
                 [] if ok else [f"{100 * acc:.1f}% under {attack} at eps {eps:g}: does not fall towards 0"], acc)


def _curve_gap(curve: dict | None, name: str, higher: str, lower: str, tol: float, why: str) -> Check:
    """Fails at each radius where attack ``higher`` leaves more accuracy than attack ``lower`` on
    ``curve`` by more than ``max(tol, 3 / n)``; ``why`` says what such a gap means. ``value``:
    the largest gap."""
    if curve is None:
        return Check(name, None, NO_CURVE)
    acc, t = curve["accuracy"], tolerance(curve["n"], tol)
    hi, lo = curve_label(curve, higher), curve_label(curve, lower)
    gaps = [(e, h, low) for e, h, low in zip(curve["eps"], acc[higher], acc[lower])]
    bad = [f"eps {e:g}: {hi} {100 * h:.1f}% > {lo} {100 * low:.1f}% by {100 * (h - low):.1f} points"
           for e, h, low in gaps if h - low > t]
    return Check(name, not bad, f"{hi} vs {lo} at every radius on {curve['n']} examples, tolerance "
                 f"{100 * t:.1f} points (a larger gap: {why})", bad, max(h - low for _, h, low in gaps))


def single_step_not_stronger(curve: dict | None, tol: float = TOL) -> Check:
    """FGSM does not beat PGD-10 (a single step stronger than an iterative attack)."""
    return _curve_gap(curve, "FGSM not stronger than PGD", "PGD-10", "FGSM", tol,
                      "a single step is stronger than the iterative attack")


def random_start_not_needed(curve: dict | None, tol: float = RANDOM_START_GAIN) -> Check:
    """BIM-10 (from the clean input) is not much weaker than PGD-10 (from a random start)."""
    return _curve_gap(curve, "BIM (from the input) not much weaker than PGD (random start)", "BIM-10", "PGD-10", tol,
                      "the gradient at the clean input misleads; only a random start finds the adversarial "
                      "direction (local gradient masking)")


def more_steps_gain_little(curve: dict | None, tol: float = MORE_STEPS_GAIN) -> Check:
    """PGD with ``long`` steps is not much stronger than PGD-10 (PGD-10 converged)."""
    return _curve_gap(curve, "more PGD steps gain little", "PGD-10", "PGD-long", tol,
                      "PGD-10 is far from converged; its numbers overstate robustness")


def surrogates_not_stronger(surrogates: RobustnessReport | None, tol: float = STRONGER_ATTACK_GAIN) -> Check:
    """The per-example best of PGD through several surrogates (``surrogates``' rows, the paper's
    first) is not much stronger than the paper's surrogate alone. ``value``: the gap."""
    name = "no attack surrogate much stronger than the paper's"
    if surrogates is None:
        return Check(name, None, "no surrogate attacks run")
    rows = [a.name for a in surrogates.attacks]
    paper, t = surrogates.accuracy(rows[0]), tolerance(surrogates.n, tol)
    best = int(surrogates.union(rows).sum()) / max(surrogates.n, 1)
    strongest = min(rows, key=surrogates.accuracy)
    ok = paper - best <= t
    return Check(name, ok, f"'{rows[0]}' vs the per-example best of all {len(rows)} surrogates at eps "
                 f"{surrogates.attacks[0].eps:g} on {surrogates.n} examples, tolerance {100 * t:.1f} points",
                 [] if ok else [f"'{rows[0]}' {100 * paper:.1f}%, per-example best {100 * best:.1f}% (strongest "
                                f"alone '{strongest}' {100 * surrogates.accuracy(strongest):.1f}%) - the paper's "
                                "attack surrogate understates the attack"], paper - best)


def zero_gradients_rare(gradients: dict | None, limit: float = ZERO_GRADIENT_MAX) -> Check:
    """At most ``max(limit, 3 / n)`` of the clean inputs have an exactly zero input gradient
    (``gradients``: :func:`pyens.eval.dml.gradient_stats`' ``{"zero_grad", "saturated", "n"}``)."""
    name = "input gradients rarely exactly zero"
    if gradients is None:
        return Check(name, None, "no gradient statistics")
    zero, lim = gradients["zero_grad"], tolerance(gradients["n"], limit)
    ok = zero <= lim
    return Check(name, ok, f"CE of the attacked logits at {gradients['n']} clean inputs (saturated softmax on "
                 f"{100 * gradients['saturated']:.1f}%), zero gradients on at most {100 * lim:.1f}%",
                 [] if ok else [f"zero input gradients on {100 * zero:.1f}% of clean inputs"], zero)


def transfer_from_model_not_stronger(transfer: dict | None, tol: float = TOL) -> Check:
    """PGD crafted on another model is not stronger than the same PGD on the judged model
    (``transfer``: ``{"source", "transfer", "white_box", "n"}``, accuracies of the judged model)."""
    name = "transfer from another model not stronger than white-box"
    if transfer is None:
        return Check(name, None, "no other model to transfer from")
    tr, wb, t = transfer["transfer"], transfer["white_box"], tolerance(transfer["n"], tol)
    ok = tr >= wb - t
    return Check(name, ok, f"PGD crafted on {transfer['source']} vs white-box PGD on {transfer['n']} examples, "
                 f"tolerance {100 * t:.1f} points",
                 [] if ok else [f"transferred from {transfer['source']}: {100 * tr:.1f}% < white-box {100 * wb:.1f}%"
                                " - a transfer attack beats the white-box one"], tr - wb)


def cw_constant_not_weaker(cw: dict | None, tol: float = STRONGER_ATTACK_GAIN) -> Check:
    """CW at the fixed constant c = 1 is not much weaker than CW over a ladder of constants
    (``cw``: :func:`pyens.eval.dml.cw_check`'s ``{"n", "c1", "ladder", ...}``)."""
    name = "CW at c = 1 not much weaker than over a ladder of c"
    if cw is None:
        return Check(name, None, "no CW runs")
    c1, ladder, t = cw["c1"]["accuracy"], cw["ladder"]["accuracy"], tolerance(cw["n"], tol)
    ok = c1 - ladder <= t
    return Check(name, ok, f"CW c = 1 {100 * c1:.1f}% vs c in (1, 10, 100) {100 * ladder:.1f}% (median l2 of its "
                 f"adversarial examples {cw['ladder']['median_l2']:.2f}) on {cw['n']} examples, tolerance "
                 f"{100 * t:.1f} points",
                 [] if ok else [f"CW c = 1 {100 * c1:.1f}% > ladder {100 * ladder:.1f}% - the fixed-c CW number "
                                "reflects the logit scale, not robustness"], c1 - ladder)


def cw_raw_logits_not_weaker(cw: dict | None, tol: float = STRONGER_ATTACK_GAIN) -> Check:
    """CW c = 1 on the raw logits (torchattacks as it is, ``cw["unshifted"]``) is not much weaker
    than on the shifted logits (``cw["c1"]``)."""
    name = "CW on the raw logits not much weaker than on shifted ones"
    if cw is None or cw.get("unshifted") is None:
        return Check(name, None, "no CW run on the raw logits")
    raw, c1, t = cw["unshifted"]["accuracy"], cw["c1"]["accuracy"], tolerance(cw["n"], tol)
    ok = raw - c1 <= t
    return Check(name, ok, f"CW c = 1 on the raw logits {100 * raw:.1f}% vs on shifted logits {100 * c1:.1f}% on "
                 f"{cw['n']} examples, tolerance {100 * t:.1f} points",
                 [] if ok else [f"raw logits {100 * raw:.1f}% > shifted {100 * c1:.1f}% - torchattacks' CW loses its "
                                "gradient on these logits; its number is void"], raw - c1)
