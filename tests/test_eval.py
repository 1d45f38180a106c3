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
