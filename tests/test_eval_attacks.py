"""The attack catalogue: every adapter runs on a tiny model; evaluate() on every model kind."""
import pytest
import torch
from torch import nn

from pyens.eval import CATALOGUE, AttackSpec, RobustnessReport, catalogue, evaluate, lp_norm, targets
from pyens.eval.catalogue import APGD_KEYS, MINIMUM_NORM, preset_params
from tests.eval_helpers import linear, one_thread  # noqa: F401 (autouse fixture)

# Cheap parameters for each catalogue attack (the tiny model is not robust; they still work).
TINY = {
    "pgd_linf": dict(steps=5, alpha=0.1), "pgd_l2": dict(steps=5, alpha=0.5), "pgd_l1": dict(steps=5, alpha=3.0),
    "msd": dict(steps=5, alpha=(0.1, 0.5, 3.0)),
    "hsj": dict(steps=2, initial_gradient_eval_steps=10, max_gradient_eval_steps=20),
    "cw_l2": dict(binary_search_steps=2, steps=20), "boundary": dict(steps=50),
    "salt_pepper": dict(steps=50), "ead_l1": dict(binary_search_steps=2, steps=30, initial_const=1.0),
    "autoattack_linf": {}, "autoattack_l2": {},
    **{key: dict(steps=10) for key in APGD_KEYS},
}


@pytest.fixture(scope="module")
def tiny():
    """A linear classifier on 1x8x8 inputs and 8 inputs it classifies as their labels."""
    model = linear()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_presets_cover_the_catalogue_and_label_every_cut():
    assert (set(preset_params("paper", "mnist")) == set(CATALOGUE) - set(APGD_KEYS)
            == set(preset_params("quick", "mnist")))
    paper = {s.key: s for s in catalogue("paper", "mnist")}
    assert all(s.note == "" for s in paper.values())
    assert paper["pgd_l1"].params["steps"] == 200 and paper["pgd_l1"].params["k"] == 20
    assert paper["pgd_linf"].params["restarts"] == 10 and paper["pgd_linf"].params["alpha"] == 0.01
    assert paper["hsj"].params["steps"] == 64 and paper["boundary"].params["steps"] == 25000
    quick = {s.key: s for s in catalogue("quick", "mnist", subsets={"hsj": 100})}
    assert "steps 50 (paper 200)" in quick["pgd_linf"].note
    assert quick["hsj"].note.startswith("first 100 examples only") and quick["hsj"].n == 100
    assert [s.group for s in catalogue("paper", "mnist")] == ["linf"] * 3 + ["l2"] * 4 + ["l1"] * 3 + ["other"]
    assert {s.key for s in catalogue("paper", "mnist") if s.kind == "black-box"} == {"hsj", "boundary", "salt_pepper"}
    with pytest.raises(ValueError, match="not in the"):
        catalogue("pgd", "mnist", only=["hsj"])


def test_the_main_jobs_preset_is_pgd_plus_autoattacks_gradient_attacks():
    specs = {s.key: s for s in catalogue("pgd+apgd", "mnist")}
    assert list(specs) == ["pgd_linf", "pgd_l2", "pgd_l1", *APGD_KEYS]
    for key in APGD_KEYS:  # AutoAttack's standard version: 100 iterations, one restart
        assert specs[key].params == {"eps": specs[key].eps, "steps": 100, "n_restarts": 1}
        assert specs[key].eps == {"linf": 0.3, "l2": 2.0}[specs[key].norm]
    assert specs["pgd_l1"].params["steps"] == 50
    assert specs["apgd_t_l2"].name == "APGD-T l2 (eps 2, 100 steps)"


def test_apgd_t_is_targeted_and_apgd_ce_is_not(tiny, monkeypatch):
    """The adapters reach torchattacks' APGDT (targeted DLR) and APGD with loss 'ce'."""
    import torchattacks

    made = []
    for name in ("APGD", "APGDT"):
        real = getattr(torchattacks, name)
        monkeypatch.setattr(torchattacks, name, lambda *a, _n=name, _r=real, **kw: made.append((_n, kw)) or _r(*a, **kw))
    model, x, y = tiny
    for key in APGD_KEYS:
        (spec,) = catalogue("pgd+apgd", "mnist", only=[key], params={key: dict(steps=2)})
        spec.make(model)(x, y)
    assert [(n, kw.get("loss"), kw["norm"]) for n, kw in made] == [
        ("APGD", "ce", "Linf"), ("APGDT", None, "Linf"), ("APGD", "ce", "L2"), ("APGDT", None, "L2")]


@pytest.mark.parametrize("key", list(CATALOGUE))
def test_every_adapter_runs_on_a_tiny_model(tiny, key):
    model, x, y = tiny
    preset = "pgd+apgd" if key in APGD_KEYS else "quick"
    (spec,) = catalogue(preset, "mnist", only=[key], params={key: TINY[key]})
    atk = spec.make(model)
    torch.manual_seed(0)
    x_adv = atk(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    assert fooled.any(), f"{key} fooled nothing on a non-robust linear model"
    if spec.eps is not None and key not in MINIMUM_NORM:  # bounded attacks stay in the ball
        assert (lp_norm(x_adv - x, spec.norm) <= spec.eps * (1 + 1e-4) + 1e-5).all()


def test_evaluate_judges_the_radius_and_keeps_distances(tiny):
    model, x, y = tiny

    def far(m):  # "fools" everything, but far outside the l2 ball
        return lambda xb, yb: (1 - xb)

    specs = [AttackSpec("far", "l2", far, {}, "l2", 0.5), AttackSpec("far, no radius", "other", far, {}, None, None)]
    rep = evaluate(model, (x, y), attacks=specs, n=8, batch_size=3, progress=False)
    with torch.no_grad():
        wrong = model(1 - x).argmax(1) != y
    assert wrong.any()
    assert rep.accuracies()["far"] == 1.0                      # outside the ball: never a success
    assert torch.equal(rep.result("far, no radius").correct, ~wrong)
    d = rep.result("far").distance
    assert torch.isinf(d[~wrong]).all() and torch.allclose(d[wrong], (1 - 2 * x).flatten(1).norm(dim=1)[wrong])


def test_evaluate_subset_resume_and_progress(tiny):
    model, x, y = tiny
    specs = catalogue("quick", "mnist", only=["pgd_linf", "salt_pepper"], params={k: TINY[k] for k in
                                                                                  ("pgd_linf", "salt_pepper")},
                      subsets={"salt_pepper": 3})
    seen = []
    rep = evaluate(model, (x, y), attacks=specs, n=8, batch_size=4, progress=True, on_result=lambda r: seen.append(
        len(r.attacks)))
    sp = rep.result(specs[1].name)
    assert seen == [1, 2] and sp.attacked.tolist() == [True] * 3 + [False] * 5 and sp.correct[3:].all()
    calls = []
    spy = AttackSpec(specs[0].name, "linf", lambda m: calls.append(1), specs[0].params, "linf", 0.3, n=None)
    again = evaluate(model, (x, y), attacks=[spy, specs[1]], n=8, batch_size=4, progress=False, resume=rep)
    assert not calls and again.accuracies() == rep.accuracies()  # both reused, nothing re-run
    (msd,) = catalogue("quick", "mnist", only=["msd"], params={"msd": TINY["msd"]})  # tuple parameters
    first = evaluate(model, (x, y), attacks=[msd], n=8, progress=False)
    read_back = RobustnessReport.from_json(first.to_json())
    spy = AttackSpec(msd.name, "other", lambda m: calls.append(1), msd.params)
    evaluate(model, (x, y), attacks=[spy], n=8, progress=False, resume=read_back)
    assert not calls


def _members(k=3):
    from pyens.nn import Ensemble

    torch.manual_seed(1)
    return Ensemble([nn.Sequential(nn.Flatten(), nn.Linear(64, 10)) for _ in range(k)], num_classes=10).eval()


def test_evaluate_attacks_ensembles_through_their_average_and_dml_through_the_surrogate(tiny):
    from pyens.nn import MIMO

    _, x, y = tiny
    ens = _members()
    predict, attack = targets(ens)
    assert predict is attack and torch.allclose(predict(x), ens.ensemble(x))
    torch.manual_seed(0)
    mimo = MIMO("small_cnn", members=3, in_channels=1, num_classes=10).eval()
    pgd = catalogue("quick", "mnist", only=["pgd_linf"], params={"pgd_linf": TINY["pgd_linf"]})
    for model in (ens, mimo):
        rep = evaluate(model, (x, y), attacks=pgd, n=8, progress=False)
        assert rep.accuracies()["All attacks"] < 0.5

    class Vote(nn.Module):
        """A DML-like decision with no useful gradient, and its differentiable surrogate."""

        def __init__(self, net):
            super().__init__()
            self.net, self.surrogate = net, net

        def forward(self, z):
            logits = self.net(z)
            return nn.functional.one_hot(logits.argmax(1), 10).float() + 0 * logits  # zero gradient

    vote = Vote(linear())
    with torch.no_grad():
        yv = vote(x).argmax(1)
    predict, attack = targets(vote)
    assert predict is vote and attack is vote.net
    rep = evaluate(vote, (x, yv), attacks=pgd, n=8, progress=False)
    assert rep.accuracies()["Clean accuracy"] == 1.0 and rep.accuracies()["All attacks"] < 0.5
    blind = evaluate(vote, (x, yv), attacks=pgd, n=8, progress=False, surrogate=vote)  # attack the vote itself
    assert blind.accuracies()["All attacks"] == 1.0


def test_decision_attacks_survive_inputs_without_an_adversarial_start(tiny):
    """foolbox's Boundary and HSJ raise for the whole batch when their start fails on one input."""
    model, x, y = tiny

    specs = catalogue("quick", "mnist", only=["hsj", "boundary"], params={k: TINY[k] for k in ("hsj", "boundary")})

    class Stubborn(nn.Module):  # always class 0: no adversarial example exists for class-0 inputs
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, z):
            return nn.functional.one_hot(torch.zeros(len(z), dtype=torch.long), 10).float() + self.w * 0

    yy = torch.tensor([0, 0, 0, 0, 1, 2, 3, 4])
    rep = evaluate(Stubborn(), (x, yy), attacks=specs, n=8, progress=False)
    for s in specs:
        assert rep.result(s.name).correct[:4].all()  # no start: the attack failed there, and said nothing
