"""Robustness reports: per-example worst cases and the Table 4 layout."""
import torch

from pyens.eval import AttackResult, RobustnessReport, format_table


def _report():
    t = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    clean = t(1, 1, 1, 1, 0)
    attacks = [AttackResult("PGD linf", "linf", t(1, 0, 1, 1, 1)),
               AttackResult("FGSM", "linf", t(1, 1, 0, 1, 1)),
               AttackResult("PGD l2", "l2", t(1, 1, 1, 0, 1)),
               AttackResult("PGD l1", "l1", t(1, 1, 1, 1, 1))]
    return RobustnessReport("m", clean, attacks)


def test_union_is_per_example_and_needs_clean_correctness():
    r = _report()
    acc = r.accuracies()
    assert acc["Clean accuracy"] == 0.8
    assert acc["PGD l1"] == 0.8          # example 4 is misclassified clean: never robust
    assert acc["All linf"] == 0.4        # examples 0 and 3
    assert acc["All l2"] == 0.6
    assert acc["All attacks"] == 0.2     # only example 0 survives everything
    assert list(acc) == ["Clean accuracy", "PGD linf", "FGSM", "All linf", "PGD l2", "All l2", "PGD l1",
                         "All l1", "All attacks"]


def test_json_round_trip_keeps_per_example_results(tmp_path):
    r = _report()
    r.to_json(tmp_path / "r.json")
    back = RobustnessReport.from_json(tmp_path / "r.json")
    assert back.accuracies() == r.accuracies()
    assert torch.equal(back.union(["PGD linf", "PGD l2"]), r.union(["PGD linf", "PGD l2"]))


def test_table_layout_side_by_side():
    a, b = _report(), _report()
    b.model = "other"
    text = format_table([a, b])
    assert text.splitlines()[0].split() == ["Attack", "m", "other"]
    assert "All attacks" in text.splitlines()[-1] and "20.0" in text.splitlines()[-1]
    md = format_table([a], markdown=True)
    assert md.startswith("| Attack | m |") and "| **All linf** | **40.0** |" in md


def test_partial_attack_row_is_on_its_subset_and_unions_are_marked_upper_bounds():
    t = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    clean = t(1, 1, 1, 1)
    attacks = [AttackResult("PGD linf", "linf", t(1, 0, 1, 1)),
               # ran on the first two examples only; fooled example 0
               AttackResult("HSJ", "linf", t(0, 1, 1, 1), kind="black-box", attacked=t(1, 1, 0, 0))]
    r = RobustnessReport("m", clean, attacks)
    rows = {label: (acc, partial) for label, acc, partial in r.rows()}
    assert rows["HSJ"] == (0.5, True)                      # 1 of the 2 attacked examples
    assert rows["All linf"] == (0.5, True)                 # examples 2, 3 never saw HSJ: upper bound
    assert rows["PGD linf"] == (0.75, False)
    assert torch.equal(r.robust("HSJ"), t(0, 1, 1, 1))
    md = format_table([r], markdown=True)
    assert "| HSJ | 50.0† |" in md and "| **All attacks** | **50.0†** |" in md


def test_all_attacks_includes_the_other_group_and_other_gets_no_union_row_alone():
    t = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    r = RobustnessReport("m", t(1, 1, 1), [AttackResult("PGD l2", "l2", t(1, 1, 1)),
                                           AttackResult("MSD", "other", t(1, 0, 1))])
    acc = r.accuracies()
    assert "All other" not in acc and acc["All attacks"] == 2 / 3 and acc["All l2"] == 1.0


def test_json_round_trip_keeps_distances_subsets_and_kinds():
    t = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    a = AttackResult("CW", "l2", t(1, 0), {"c": (1.0, 10.0)}, 1.5, "white-box", "l2", 2.0,
                     torch.tensor([float("inf"), 1.25]), t(1, 1), "steps 100 (paper 1000)", "cw_l2")
    r = RobustnessReport("m", t(1, 1), [a], {"dataset": "mnist"})
    back = RobustnessReport.from_json(r.to_json())
    b = back.attacks[0]
    assert (b.kind, b.norm, b.eps, b.note, b.key) == ("white-box", "l2", 2.0, "steps 100 (paper 1000)", "cw_l2")
    assert b.distance[0] == float("inf") and b.distance[1] == 1.25 and torch.equal(b.attacked, a.attacked)
