"""Robustness and transfer reports by value: exact tables, JSON fields and defaults, the wiring
of ``transfer_matrix`` / ``transfer_tables`` (issue 17, item 5: the mutants these kill)."""
import json

import pytest
import torch
from torch import nn

import pyens.attacks
from pyens.eval import AttackResult, RobustnessReport, format_table
from pyens.eval.results import markdown_table
from pyens.eval.transfer import TransferReport, members_of, submodel_table, transfer_matrix, transfer_tables

t = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731


def _two_reports():
    # m: clean 4/5; robust to PGD linf on 0, 2, 3; to PGD l2 on 0, 1, 2; to both on 0, 2
    m = RobustnessReport("m", t(1, 1, 1, 1, 0), [AttackResult("PGD linf", "linf", t(1, 0, 1, 1, 1)),
                                                 AttackResult("PGD l2", "l2", t(1, 1, 1, 0, 1))])
    # other-model: clean 2/4; PGD linf leaves example 0, MSD example 1, nothing survives both
    o = RobustnessReport("other-model", t(1, 1, 0, 0), [AttackResult("PGD linf", "linf", t(1, 0, 1, 1)),
                                                        AttackResult("MSD", "other", t(0, 1, 1, 1))])
    return m, o


def test_text_table_of_two_reports_is_exact():
    m, o = _two_reports()
    want = ("Attack             m  other-model\n"
            "---------------------------------\n"
            "Clean accuracy  80.0         50.0\n"
            "PGD linf        60.0         25.0\n"
            "All linf        60.0         25.0\n"
            "PGD l2          60.0            -\n"
            "All l2          60.0            -\n"
            "MSD                -         25.0\n"
            "All attacks     40.0          0.0\n")
    assert format_table([m, o]) == want
    assert m.table() == format_table([m]) and m.table().splitlines()[2] == "Clean accuracy  80.0"


def test_markdown_table_bolds_the_worst_cases_only():
    m, _ = _two_reports()
    want = ("| Attack | m |\n|---|---|\n| Clean accuracy | 80.0 |\n| PGD linf | 60.0 |\n"
            "| **All linf** | **60.0** |\n| PGD l2 | 60.0 |\n| **All l2** | **60.0** |\n"
            "| **All attacks** | **40.0** |\n")
    assert m.to_markdown() == want
    assert markdown_table(["a", "b"], [["All x", ""], ["y", "1"]], bold=lambda r: r[0].startswith("All")) == \
        "| a | b |\n|---|---|\n| **All x** |  |\n| y | 1 |\n"


def test_rows_on_one_example_two_other_attacks_and_an_unattacked_miss():
    one = RobustnessReport("m", t(1), [AttackResult("A", "l2", t(1), attacked=t(1))])
    assert one.rows() == [("Clean accuracy", 1.0, False), ("A", 1.0, False), ("All l2", 1.0, False),
                          ("All attacks", 1.0, False)]
    two = RobustnessReport("m", t(1, 1, 1), [AttackResult("MSD", "other", t(1, 0, 1)),
                                             AttackResult("AA", "other", t(1, 1, 0))])
    assert two.accuracies() == {"Clean accuracy": 1.0, "MSD": 2 / 3, "AA": 2 / 3, "All other": 1 / 3,
                                "All attacks": 1 / 3}
    # the attack ran on example 0 only: example 1 counts as robust although its entry says wrong
    r = RobustnessReport("m", t(1, 1), [AttackResult("HSJ", "linf", t(0, 0), attacked=t(1, 0))])
    assert torch.equal(r.robust("HSJ"), t(0, 1)) and r.accuracy("HSJ") == 0.0
    with pytest.raises(KeyError, match=r"attack 'PGD' not in this report; it has \['HSJ'\]"):
        r.result("PGD")


def test_json_fields_defaults_and_indentation():
    a = AttackResult("CW", "l2", t(1, 0), {"c": 1.0}, 2.5, "black-box", "l2", 2.0,
                     torch.tensor([float("inf"), 1.25]), t(1, 0), "steps 10", "cw_l2")
    assert a.to_dict() == {"name": "CW", "group": "l2", "kind": "black-box", "norm": "l2", "eps": 2.0,
                           "params": {"c": 1.0}, "seconds": 2.5, "note": "steps 10", "key": "cw_l2",
                           "correct": [1, 0], "distance": [None, 1.25], "attacked": [1, 0]}
    b = AttackResult.from_dict(a.to_dict())
    assert (b.params, b.seconds, b.kind, b.note, b.key) == ({"c": 1.0}, 2.5, "black-box", "steps 10", "cw_l2")
    assert b.attacked.dtype == torch.bool and b.correct.dtype == torch.bool
    bare = AttackResult.from_dict({"name": "X", "group": "l1", "correct": [0, 1]})
    assert (bare.params, bare.seconds, bare.kind, bare.norm, bare.eps, bare.distance, bare.attacked, bare.note,
            bare.key) == ({}, 0.0, "white-box", None, None, None, None, "", "")

    r = RobustnessReport("m", t(1, 1), [a], {"dataset": "mnist"})
    text = r.to_json()
    assert text.startswith('{\n "model": "m",\n "n": 2,\n "meta": {\n  "dataset": "mnist"\n },\n "accuracy": {')
    d = json.loads(text)
    assert set(d) == {"model", "n", "meta", "accuracy", "clean", "attacks"} and d["clean"] == [1, 1]
    assert d["accuracy"] == {"Clean accuracy": 1.0, "CW": 1.0, "All l2": 1.0, "All attacks": 1.0}  # 1 unattacked
    back = RobustnessReport.from_json("  \n" + text)  # JSON text, not a path, even after whitespace
    assert back.model == "m" and back.meta == {"dataset": "mnist"} and back.clean.dtype == torch.bool
    plain = RobustnessReport.from_dict({"model": "z", "clean": [1], "attacks": []})
    assert plain.meta == {} and plain.model == "z" and plain.clean.dtype == torch.bool


# -- transfer ------------------------------------------------------------------------------------

def _transfer(n4=True):
    labels = ["Sub-model 1", "Sub-model 2", "Ensemble"]
    wrong = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]],      # crafted on sub-model 1
                          [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]],      # on 2: fools no one but the ensemble
                          [[0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]], dtype=torch.bool)
    clean_wrong = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    return TransferReport("m", "linf", 0.3, labels, list(labels), wrong, clean_wrong, {"steps": 5})


def test_transfer_counts_ratios_and_robust_accuracy_by_hand():
    r = _transfer()
    assert r.counts().tolist() == [[2, 1, 3], [0, 0, 1], [1, 2, 4]]
    assert (r.ratio(0, 1), r.ratio(0, 2), r.ratio(2, 0), r.ratio(2, 1)) == (0.5, 1.5, 0.25, 0.5)
    assert r.ratio(1, 2) != r.ratio(1, 2)  # N_ii = 0: nan, not a ZeroDivisionError
    # sub-model 1: clean-right on 0-2, its own attack misses 2, 3 -> example 2 only
    assert r.robust_accuracy() == {"Sub-model 1": 0.25, "Sub-model 2": 0.75, "Ensemble": 0.0}
    one = TransferReport("m", "l2", 1.0, ["Sub-model 1", "Ensemble"], ["Sub-model 1", "Ensemble"],
                         torch.zeros(2, 2, 1, dtype=torch.bool), torch.zeros(2, 1, dtype=torch.bool))
    assert one.robust_accuracy() == {"Sub-model 1": 1.0, "Ensemble": 1.0}


def test_transfer_tables_are_exact():
    r = _transfer()
    assert r.table(markdown=True) == (
        "| linf crafted on \\ judged by | Sub-model 1 | Sub-model 2 | Ensemble |\n|---|---|---|---|\n"
        "| Sub-model 1 | 2 | 1 (50.0%) | 3 (150.0%) |\n| Sub-model 2 | 0 | 0 | 1 |\n"
        "| Ensemble | 1 (25.0%) | 2 (50.0%) | 4 |\n| No attack | 1 | 1 | 0 |\n")
    assert r.table() == (
        "linf crafted on \\ judged by  Sub-model 1  Sub-model 2    Ensemble\n"
        + "-" * 65 + "\n"  # 27 + 2 + 11 + 2 + 11 + 2 + 10
        "Sub-model 1                            2    1 (50.0%)  3 (150.0%)\n"
        "Sub-model 2                            0            0           1\n"
        "Ensemble                       1 (25.0%)    2 (50.0%)           4\n"
        "No attack                              1            1           0\n")
    l2 = TransferReport("m", "l2", 2.0, r.sources, r.targets, r.wrong, r.clean_wrong)
    assert submodel_table([r, l2]) == (
        "Attack              Ensemble  Sub-model 1  Sub-model 2\n"
        "------------------------------------------------------\n"
        "PGD linf (eps 0.3)       0.0         25.0         75.0\n"
        "PGD l2 (eps 2)           0.0         25.0         75.0\n")
    assert submodel_table([r], markdown=True) == (
        "| Attack | Ensemble | Sub-model 1 | Sub-model 2 |\n|---|---|---|---|\n"
        "| PGD linf (eps 0.3) | 0.0 | 25.0 | 75.0 |\n")


def test_transfer_json_round_trip_keeps_every_field():
    r = _transfer()
    d = json.loads(json.dumps(r.to_dict()))
    assert d["counts"] == [[2, 1, 3], [0, 0, 1], [1, 2, 4]] and d["n"] == 4 and d["params"] == {"steps": 5}
    back = TransferReport.from_dict(d)
    assert (back.model, back.norm, back.eps, back.sources, back.targets, back.params) == \
        ("m", "linf", 0.3, r.sources, r.targets, {"steps": 5})
    assert back.wrong.dtype == back.clean_wrong.dtype == torch.bool
    assert torch.equal(back.wrong, r.wrong) and torch.equal(back.clean_wrong, r.clean_wrong)
    d.pop("params")
    assert TransferReport.from_dict(d).params == {}


def test_members_of_every_kind_of_ensemble():
    from pyens.ensembles import ConsensusClassifier
    from pyens.nn import Ensemble

    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    ens = Ensemble([a, b], num_classes=2)
    assert members_of(ens) == [a, b]
    assert members_of(ConsensusClassifier(ens, "vote")) == [a, b]  # a wrapper: its net's members

    class Run:  # members() a method, as a training Run
        def members(self):
            return [a, b]

    class Listed(nn.Module):  # a ModuleList is callable but is the list itself
        def __init__(self):
            super().__init__()
            self.members = nn.ModuleList([a, b])

    class Both:  # a .member method does not make a list .members an index range
        members = [b, a]

        def member(self, i):
            raise AssertionError("not used with a list .members")

    assert members_of(Run()) == [a, b] and members_of(Listed()) == [a, b] and members_of(Both()) == [b, a]

    class Counted:  # an int .members without .member(i) or a .net is not an ensemble
        members = 2

    want = ("Counted has no sub-models: it needs .member(i) with an int .members, or a list .members (or a "
            "method .members() returning one)")
    with pytest.raises(ValueError) as err:
        members_of(Counted())
    assert str(err.value) == want


# -- transfer_matrix wiring, with a stand-in attack whose outputs are known --------------------------

class Threshold(nn.Module):
    """Class 1 iff the mean pixel exceeds ``t``; ``push``: what the stand-in attack adds to x."""

    def __init__(self, t, push):
        super().__init__()
        self.t, self.push, self.moved = t, push, []

    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([self.t - m, m - self.t], -1)

    def to(self, *args, **kwargs):
        self.moved.append(args[0] if args else kwargs.get("device"))
        return super().to(*args, **kwargs)


class Decider(Threshold):
    """The ensemble's decision (threshold 0.4) over its listed members."""

    def __init__(self, members):
        super().__init__(0.4, 0.5)  # push 0.5 would flag an attack crafted on the decision, not the surrogate
        self.members = members


@pytest.fixture
def stand_in(monkeypatch):
    calls = []

    class StandIn:
        def __init__(self, model, **kw):
            self.model, self.kw = model, kw

        def __call__(self, x, y):
            calls.append((self.model, self.kw, len(x), x.device, y.device))
            return (x + self.model.push).clamp(0, 1)

    monkeypatch.setattr(pyens.attacks, "PGD", StandIn)
    return calls


def test_transfer_matrix_on_a_stand_in_attack_with_known_answers(stand_in, capsys, monkeypatch):
    monkeypatch.setenv("PYENS_PROGRESS_SECONDS", "1e9")  # only the closing progress line
    a, b, s = Threshold(0.2, 0.15), Threshold(0.6, -0.15), Threshold(0.0, -0.35)
    ens = Decider([a, b])
    x = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.95]).view(6, 1, 1, 1)
    y = torch.tensor([0, 0, 1, 1, 1, 0])  # the sixth example is beyond n
    r = transfer_matrix(ens, (x, y), norm="l1", eps=0.5, alpha=0.1, steps=3, k=7, n=5, batch_size=2, device="cpu",
                        name="m", ensemble_label="Vote", surrogate=s)
    assert r.sources == r.targets == ["Sub-model 1", "Sub-model 2", "Vote"] and r.n == 5
    assert (r.model, r.norm, r.eps, r.params) == ("m", "l1", 0.5, dict(norm="l1", eps=0.5, alpha=0.1, steps=3, k=7))
    # a (t 0.2) is wrong on x=0.3; b (t 0.6) on x=0.5; the vote (t 0.4) on none
    assert r.clean_wrong.int().tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert r.wrong.int().tolist() == [
        [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]],   # x + 0.15
        [[0, 0, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 0, 0]],   # x - 0.15
        [[0, 0, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 0]]]   # x - 0.35: crafted on the surrogate
    assert [(c[0], c[2]) for c in stand_in] == [(a, 2), (b, 2), (s, 2)] * 2 + [(a, 1), (b, 1), (s, 1)]
    assert all(c[1] == dict(norm="l1", eps=0.5, alpha=0.1, steps=3, k=7) for c in stand_in)
    assert a.moved == b.moved == s.moved == ens.moved == [torch.device("cpu")]
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("transfer m l1: 9/9 batch (100%)")


def test_transfer_matrix_defaults(stand_in, capsys, monkeypatch):
    monkeypatch.setenv("PYENS_PROGRESS_SECONDS", "1e9")
    a = Threshold(0.5, 0.0)
    x, y = torch.rand(1001, 1, 1, 1), torch.zeros(1001, dtype=torch.long)
    r = transfer_matrix(Decider([a]), (x, y), norm="linf", eps=0.1, alpha=0.05, steps=2)
    assert r.n == 1000 and r.model == "model" and r.targets[-1] == "Ensemble" and r.params["k"] == 20
    assert [c[2] for c in stand_in] == [250] * 8 and stand_in[0][1]["k"] == 20
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("transfer model linf: 8/8 batch (100%)")


class _Named:
    """A dataset with a name (the paper radii's key)."""

    name = "mnist"

    def __init__(self, x, y):
        self.images, self.labels = x, y

    def __len__(self):
        return len(self.labels)


def test_transfer_tables_take_radii_and_steps_from_the_dataset_or_eps(stand_in):
    from pyens.eval.catalogue import preset_params

    a = Threshold(0.5, 0.0)
    x, y = torch.rand(3, 1, 1, 1), torch.zeros(3, dtype=torch.long)
    kw = dict(members=[a], surrogate=a, progress=False, n=3)  # an ensemble listing no members: they must pass
    reps = transfer_tables(Decider([]), _Named(x, y), **kw)
    assert [(r.norm, r.eps) for r in reps] == [("linf", 0.3), ("l2", 2.0), ("l1", 10.0)]  # MNIST's radii
    quick = preset_params("quick", "mnist")
    assert [r.params for r in reps] == [dict(norm=p, eps=e, alpha=quick[f"pgd_{p}"]["alpha"],
                                             steps=quick[f"pgd_{p}"]["steps"], k=quick[f"pgd_{p}"]["k"])
                                        for p, e in (("linf", 0.3), ("l2", 2.0), ("l1", 10.0))]
    assert [c[1]["norm"] for c in stand_in] == ["linf"] * 2 + ["l2"] * 2 + ["l1"] * 2
    reps = transfer_tables(Decider([]), (x, y), dataset="mnist", **kw)
    assert [r.eps for r in reps] == [0.3, 2.0, 10.0]
    # radii of one's own: the quick preset's 50 steps of 2.5 eps / steps
    reps = transfer_tables(Decider([a]), (x, y), eps={"linf": 0.1, "l2": 1.0, "l1": 5.0}, **kw)
    assert [(r.eps, r.params["alpha"], r.params["steps"]) for r in reps[:2]] == [(0.1, 0.005, 50), (1.0, 0.05, 50)]
    own = {f"pgd_{p}": dict(alpha=0.5 + i, steps=2 + i, k=3 + i) for i, p in enumerate(("linf", "l2", "l1"))}
    reps = transfer_tables(Decider([a]), (x, y), eps={"linf": 0.1, "l2": 1.0, "l1": 5.0}, pgd=own, **kw)
    assert [(r.params["alpha"], r.params["steps"], r.params["k"]) for r in reps] == [(0.5, 2, 3), (1.5, 3, 4),
                                                                                    (2.5, 4, 5)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transfer_matrix_moves_cpu_data_to_the_device(stand_in):
    a = Threshold(0.5, 0.1)
    x, y = torch.rand(5, 1, 1, 1), torch.ones(5, dtype=torch.long)
    r = transfer_matrix(Decider([a]), (x, y), norm="linf", eps=0.1, alpha=0.05, steps=2, batch_size=2,
                        device="cuda", progress=False)
    assert a.moved == [torch.device("cuda")] and r.wrong.device.type == "cpu"
    assert {(c[3].type, c[4].type) for c in stand_in} == {("cuda", "cuda")}
    assert r.clean_wrong.int().tolist() == [(x.flatten() <= t).int().tolist() for t in (0.5, 0.4)]
