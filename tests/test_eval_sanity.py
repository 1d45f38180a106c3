"""The sanity checks the DML report adds to pyens.eval.sanity, on constructed measurements whose
verdict is known by hand: one rule, a difference counts above ``max(tol, 3 / n)``; each check
passes just inside that margin and fails just outside it. Then their Markdown."""
from __future__ import annotations

import pytest
import torch

from pyens.eval import sanity as S
from pyens.eval.dml import masking_checks
from pyens.eval.markdown import check_details, checks_table, dml_markdown, pct
from pyens.eval.results import AttackResult, RobustnessReport

JUST = 0.001  # how far inside / outside the margin the constructed numbers lie


def test_tolerance_is_the_larger_of_tol_and_three_examples():
    assert S.tolerance(1000) == S.TOL == 0.02
    assert S.tolerance(100) == pytest.approx(0.03)
    assert S.tolerance(1000, 0.10) == 0.10 and S.tolerance(20, 0.10) == pytest.approx(0.15)
    assert S.tolerance(0) == 3.0  # no examples: nothing can fire


def curve(n=1000, long=100, **acc):
    """A DML distortion-accuracy curve at eps 0, 0.1, 0.2; every attack at ``base`` unless given."""
    base = [0.99, 0.50, 0.05]
    return {"eps": [0.0, 0.1, 0.2], "long": long, "n": n,
            "accuracy": {a: acc.get(a.replace("-", "_"), base) for a in ("FGSM", "BIM-10", "PGD-10", "PGD-long")}}


def test_falls_towards_zero_at_the_largest_radius():
    at = lambda v, n=1000: S.falls_towards_zero(curve(n, PGD_long=[0.99, 0.5, v],  # noqa: E731
                                                      FGSM=[0.99, 0.6, 0.5], BIM_10=[0.99, 0.6, 0.5],
                                                      PGD_10=[0.99, 0.6, 0.5]))
    assert at(0.10 - JUST).passed and at(0.10 - JUST).value == pytest.approx(0.099)
    c = at(0.10 + JUST)
    assert c.passed is False and c.violations == ["10.1% under PGD-100 at eps 0.2: does not fall towards 0"]
    assert at(0.15 - JUST, n=20).passed  # 3 of 20 examples: 15 points
    assert S.falls_towards_zero(None).passed is None


@pytest.mark.parametrize("check, higher, lower, tol", [
    (S.single_step_not_stronger, "PGD_10", "FGSM", S.TOL),
    (S.random_start_not_needed, "BIM_10", "PGD_10", S.RANDOM_START_GAIN),
    (S.more_steps_gain_little, "PGD_10", "PGD_long", S.MORE_STEPS_GAIN)])
def test_curve_gaps_fire_just_outside_the_margin(check, higher, lower, tol):
    def gap(g, n=1000):
        return check(curve(n, **{lower: [0.99, 0.50, 0.05], higher: [0.99, 0.50 + g, 0.05]}))

    assert gap(tol - JUST).passed and gap(tol - JUST).value == pytest.approx(tol - JUST)
    c = gap(tol + JUST)
    assert c.passed is False and len(c.violations) == 1 and c.violations[0].startswith("eps 0.1: ")
    assert gap(0.15 - JUST, n=20).passed and gap(0.15 + JUST, n=20).passed is False  # 3 of 20 examples
    assert check(None).passed is None


def test_fgsm_violation_names_both_attacks():
    c = S.single_step_not_stronger(curve(FGSM=[0.99, 0.30, 0.05], PGD_10=[0.99, 0.40, 0.05]))
    assert c.violations == ["eps 0.1: PGD-10 40.0% > FGSM 30.0% by 10.0 points"]
    assert c.detail == ("PGD-10 vs FGSM at every radius on 1000 examples, tolerance 2.0 points (a larger gap: a "
                        "single step is stronger than the iterative attack)")


def test_monotone_in_radius_reads_the_dml_curve_per_attack():
    rising = lambda r: masking_checks(curve(FGSM=[0.99, 0.50, 0.50 + r]))[1]  # noqa: E731
    assert rising(0.02 - JUST).name == "accuracy non-increasing in eps" and rising(0.02 - JUST).passed
    c = rising(0.02 + JUST)
    assert c.passed is False and c.violations == ["FGSM: 52.1% at eps 0.2 > 50.0% at a smaller eps"]


def surrogates(paper: int, best: int, n: int = 100) -> RobustnessReport:
    """``n`` examples, all clean-correct: the paper's row keeps the first ``paper``, another row the
    first ``best`` (so the per-example best of both keeps ``best``)."""
    keep = lambda k: torch.arange(n) < k  # noqa: E731
    rows = [AttackResult("paper", "linf", keep(paper), eps=0.2), AttackResult("margin", "linf", keep(best))]
    return RobustnessReport("m", torch.ones(n, dtype=torch.bool), rows)


def test_surrogates_not_stronger_on_whole_examples():
    # n = 100: margin max(0.05, 0.03) = 5 points; the gap moves in whole examples of 1 point
    assert S.surrogates_not_stronger(surrogates(60, 56)).passed
    c = S.surrogates_not_stronger(surrogates(60, 54))
    assert c.passed is False and c.value == pytest.approx(0.06)
    assert c.violations == ["'paper' 60.0%, per-example best 54.0% (strongest alone 'margin' 54.0%) - the "
                            "paper's attack surrogate understates the attack"]
    assert S.surrogates_not_stronger(surrogates(60, 54, n=50)).passed  # 3 / 50 = 6 points
    assert S.surrogates_not_stronger(None).passed is None


def test_zero_gradients_rare():
    grads = lambda z, n=1000: S.zero_gradients_rare({"zero_grad": z, "saturated": 0.5, "n": n})  # noqa: E731
    assert grads(0.01 - JUST).passed and grads(0.01 + JUST).passed is False
    assert grads(0.03 - JUST, n=100).passed and grads(0.03 + JUST, n=100).passed is False
    assert grads(0.2).violations == ["zero input gradients on 20.0% of clean inputs"]


def test_transfer_from_model_not_stronger():
    tr = lambda t, n=1000: S.transfer_from_model_not_stronger(  # noqa: E731
        {"source": "base", "transfer": t, "white_box": 0.5, "n": n})
    assert tr(0.48 + JUST).passed and tr(0.48 - JUST).passed is False
    assert tr(0.3).violations == ["transferred from base: 30.0% < white-box 50.0% - a transfer attack beats the "
                                  "white-box one"]
    assert tr(0.2, n=6).passed  # 3 of 6 examples: 50 points


def test_cw_checks():
    cw = lambda c1, ladder, raw=None, n=1000: {  # noqa: E731
        "n": n, "c1": {"accuracy": c1}, "ladder": {"accuracy": ladder, "median_l2": 1.5},
        **({} if raw is None else {"unshifted": {"accuracy": raw}})}
    assert S.cw_constant_not_weaker(cw(0.5 + 0.05 - JUST, 0.5)).passed
    assert S.cw_constant_not_weaker(cw(0.5 + 0.05 + JUST, 0.5)).passed is False
    assert S.cw_raw_logits_not_weaker(cw(0.5, 0.5, raw=0.55 - JUST)).passed
    c = S.cw_raw_logits_not_weaker(cw(0.5, 0.5, raw=1.0))
    assert c.passed is False and c.value == pytest.approx(0.5)
    assert S.cw_raw_logits_not_weaker(cw(0.5, 0.5)).passed is None  # no raw-logit run
    assert S.cw_raw_logits_not_weaker(cw(0.5, 0.5, raw=1.0, n=6)).passed  # 3 / 6 = 50 points


def test_masking_checks_without_data_are_not_run_and_verdicts():
    checks = masking_checks()
    assert len(checks) == 10 and all(c.passed is None for c in checks)
    assert S.verdict(checks) == S.NO_MASKING_VERDICT and checks[0].verdict == "not run"
    failed = masking_checks(gradients={"zero_grad": 0.5, "saturated": 0.5, "n": 100})
    assert S.verdict(failed) == S.MASKING_VERDICT == "possible gradient masking"
    assert [c.name for c in failed if c.passed is False] == ["input gradients rarely exactly zero"]


def test_checks_markdown_by_value():
    ok = S.Check("a", True, "compares a")
    bad = S.Check("a", False, "compares a", ["it fired"], 0.25)
    assert checks_table([("m1", [ok]), ("m2", [bad])]).splitlines() == [
        "| Sanity check | m1 | m2 |", "|---|---|---|", "| a | pass | FAIL (possible gradient masking) (25.0%) |",
        "| **verdict** | no sign of gradient masking | **possible gradient masking** |"]
    assert check_details([("m1", [ok]), ("m2", [bad])]) == [
        "What each check compares:", "", "- a: compares a.", "", "Failures:", "", "- **m2**, a:", "  - it fired"]
    assert (pct(0.5), pct(1 / 3, 1), pct(None), pct(float("nan"))) == ("50.00", "33.3", "-", "-")


def test_dml_markdown_renders_the_saved_checks_and_rows():
    rep = surrogates(60, 54)
    checks = masking_checks(surrogates=rep)
    report = {"dataset": "mnist", "n": 100, "budget": "quick", "surrogates": {"m": rep.to_dict()},
              "honesty": {"m": [c.to_dict() for c in checks]}, "table2": [rep.to_dict()]}
    lines = dml_markdown(report).splitlines()
    for line in ("| Training Model | Benign Acc | paper | margin |", "| m | 100.00 | 60.00 | 54.00 |",
                 "| per-example best of all | 54.00 |",
                 "| no attack surrogate much stronger than the paper's | FAIL (possible gradient masking) (6.0%) |",
                 "| **verdict** | **possible gradient masking** |"):
        assert line in lines, line
