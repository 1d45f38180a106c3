"""The DML paper's evaluation: its tables, detection, certified accuracy, and an honesty check.

Attacks on an ensemble follow the paper's threat model (A.3): they are crafted on a
differentiable surrogate, the summed member logits, and judged by the ensemble's decision,
the majority vote of top-1 (:class:`pyens.ensembles.ConsensusClassifier`, run through
:func:`pyens.eval.evaluate`). The same protocol serves the baseline ensemble.

==================  ==============  ==============================================================
function            paper           what
==================  ==============  ==============================================================
table2              Tables 2-3      FGSM at two radii, BIM-10, PGD-10, CW (c = 1, 200 steps)
transfer_table      Table 4         PGD-10 crafted on member 1, untargeted and targeted: accuracy
                                    of every member and of the ensemble
cw_distortion       Table 5         targeted CW-l2 (c = 1): accuracy and mean l2 distortion of the
                                    ensemble (kappa 0, 0.1) vs each member
rdml_table          Tables 6, 9     DML vs R-DML (same weights, sigma 0.1, T = 20): FGSM, PGD-20,
                                    PGD-40, 5 random restarts
autoattack_table    Tables 7-8      torchattacks AutoAttack (standard) at three radii
certified           A.9             certified accuracy of the smoothed vote (Cohen et al.) with the
                                    DML, R-DML and AUG-DML layers
detection           A.4, A.5.1      ROC / AUC of the agreement (unanimity) and uncertainty detectors
distortion_curve    Fig. 18         accuracy vs eps: FGSM, BIM-10, PGD-10, PGD-100
surrogate_check     (honesty)       PGD through other surrogates: margin loss, averaged probability,
                                    soft vote, straight-through vote; per-example best of all
masking_checks      (honesty)       the sanity checks (:mod:`pyens.eval.sanity`) on the curve, the
                                    surrogates, the gradients, a transfer attack and CW
clever_table        Fig. 1, A.6     CLEVER-u scores (l2, radius 2) of the summed logits, beside the
                                    smallest l2 distance CW or l2 PGD found per image on that model
==================  ==============  ==============================================================

:func:`dml_report` runs any of them on trained runs and :func:`pyens.eval.markdown.dml_markdown`
lays them out as the paper does (``pyens dml-report RUN_DIR ...``).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from pyens.checks import choice_arg
from pyens.ensembles.consensus import ConsensusClassifier, SurrogateScores
from pyens.eval.catalogue import (AttackSpec, PositiveLogits, autoattack_spec, cw_ladder_spec, cw_spec,  # noqa: F401
                                  fgsm_spec, pgd_spec, quick_alpha)
from pyens.eval.curves import Curves
from pyens.eval.markdown import dml_markdown
from pyens.eval.results import RobustnessReport
from pyens.eval.robustness import evaluate, labelled, predict_labels
from pyens.eval.sanity import (Check, curve_label, cw_constant_not_weaker, cw_raw_logits_not_weaker,
                               falls_towards_zero, monotone_in_radius, more_steps_gain_little, random_start_not_needed,
                               single_step_not_stronger, surrogates_not_stronger, transfer_from_model_not_stronger,
                               zero_gradients_rare)

# Radii per dataset: Table 2/3's small and large FGSM radius (the small one is also BIM's, PGD's
# and Table 4's), Tables 6/9 and the detection figures' radius, AutoAttack's radii (Tables 7-8),
# and the distortion-accuracy curve's grid (Fig. 18).
SETTINGS = {
    "mnist": dict(small=0.2, large=0.3, strong=0.3, autoattack=(0.1, 0.2, 0.3),
                  curve=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)),
    "cifar10": dict(small=0.015, large=0.031, strong=8 / 255, autoattack=(4 / 255, 8 / 255, 16 / 255),
                    curve=(0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255, 128 / 255)),
    "resisc45": dict(small=0.015, large=0.031, strong=8 / 255, autoattack=(4 / 255, 8 / 255, 16 / 255),
                     curve=(0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255, 128 / 255)),
}
TABLES = ("table2", "transfer", "curve", "surrogates", "table5", "table6", "autoattack", "certified", "detection",
          "clever")
# Attack budgets: "paper" as the paper's text says, "quick" cut to CPU size (every cut named here).
# Sizes are caps on the report's n. CLEVER (Fig. 1): the DML paper gives no sampling settings;
# "paper" takes Weng et al.'s N_b = 500 batches of N_s = 1024 and ART's pool factor 10.
BUDGETS = {
    "paper": dict(cw_steps=200, table5_steps=1000, table5_n=100, table6_n=1000, autoattack_n=1000, certify_n=1000,
                  certify_n0=100, certify_images=1000, curve_n=1000, curve_long=100, surrogate_n=1000,
                  surrogate_steps=40, cw_ladder_n=1000, clever_n=1000, clever_batches=500, clever_samples=1024,
                  clever_pool=10),
    "quick": dict(cw_steps=200, table5_steps=200, table5_n=100, table6_n=200, autoattack_n=100, certify_n=500,
                  certify_n0=50, certify_images=100, curve_n=200, curve_long=100, surrogate_n=500,
                  surrogate_steps=40, cw_ladder_n=100, clever_n=100, clever_batches=20, clever_samples=15,
                  clever_pool=4),
}
# CLEVER's l2 ball (Fig. 1 and A.6: radius 2 for every dataset).
CLEVER_RADIUS = 2.0
# l2 PGD at that radius beside the CW ladder: a second attack whose distances CLEVER must not exceed.
CLEVER_PGD_STEPS = 100


def _settings(dataset: str) -> dict:
    choice_arg(dataset, "dataset", SETTINGS)
    return SETTINGS[dataset]


def _budget(budget: str | dict) -> dict:
    """A preset of :data:`BUDGETS`, or a dict of changes to ``"quick"``."""
    if isinstance(budget, dict):
        bad = sorted(set(budget) - set(BUDGETS["quick"]) - {"curve_eps"})
        if bad:
            raise ValueError(f"budget: unknown keys {bad}; known: {sorted(BUDGETS['quick'])} and curve_eps")
        return {**BUDGETS["quick"], **budget}
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)} or a dict of changes; got {budget!r}")
    return BUDGETS[budget]


def vote_classifier(net: nn.Module, rule: str = "vote") -> ConsensusClassifier:
    """The ensemble as the paper judges it: argmax = ``rule`` (majority vote), gradient = summed logits."""
    return ConsensusClassifier(net, rule, surrogate="sum").eval()


def _is_dml(net: nn.Module) -> bool:
    return hasattr(net, "dmls")


# ---------------------------------------------------------------------------------------------
# tables

def table2_specs(dataset: str = "mnist", *, cw_steps: int = 200) -> list[AttackSpec]:
    """Table 2 (MNIST) / Table 3 (CIFAR-10, RESISC-45): FGSM at two radii, BIM-10, PGD-10, CW."""
    s = _settings(dataset)
    return [fgsm_spec(s["small"]), fgsm_spec(s["large"]), pgd_spec(s["small"], 10, random_start=False),
            pgd_spec(s["small"], 10), cw_spec(1.0, cw_steps)]


def table2(nets: dict[str, nn.Module], data, *, dataset: str = "mnist", n: int = 1000, cw_steps: int = 200,
           batch_size: int = 250, device="auto", progress: bool = True) -> list[RobustnessReport]:
    """Tables 2-3: each ensemble judged by its majority vote, attacked through its summed logits."""
    return [evaluate(vote_classifier(net), data, attacks=table2_specs(dataset, cw_steps=cw_steps), n=n,
                     batch_size=batch_size, device=device, name=name, dataset=dataset, progress=progress)
            for name, net in nets.items()]


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
    for b, i in enumerate(range(0, len(x), batch_size)):
        torch.manual_seed(seed + b)
        yield x[i:i + batch_size], y[i:i + batch_size]


def random_targets(y: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
    """A uniformly random label ``!= y`` per example (seeded)."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, y.shape, generator=g).to(y.device)
    return (y + shift) % num_classes


def transfer_table(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 10,
                   source: int = 0, batch_size: int = 250, seed: int = 0) -> dict:
    """Table 4: PGD-``steps`` crafted on member ``source`` alone (untargeted; targeted at a random
    other label), then every member and the ensemble's vote classify the result.

    Returns ``{"columns": [...], "rows": {"Benign": [...], "Untargeted": [...], "Targeted": [...]},
    "eps", "steps", "source"}``; accuracies in [0, 1].
    """
    from pyens.attacks import PGD
    from pyens.attacks.losses import ce_loss

    net.eval()
    members = [net.member(i) for i in range(net.members)]
    judges = [vote_classifier(net)] + members
    columns = ["Ensemble"] + [f"Model {i + 1}" for i in range(net.members)]
    alpha = quick_alpha("linf", eps, steps)
    untargeted = PGD(members[source], norm="linf", eps=eps, alpha=alpha, steps=steps, random_start=True)
    targeted = PGD(members[source], norm="linf", eps=eps, alpha=alpha, steps=steps, random_start=True,
                   loss=lambda z, t: -ce_loss(z, t))
    target = random_targets(y, net.num_classes, seed)
    correct = {row: torch.zeros(len(judges)) for row in ("Benign", "Untargeted", "Targeted")}
    hit = torch.zeros(len(judges))
    for (xb, yb), tb in zip(_batches(x, y, batch_size, seed), target.split(batch_size)):
        x_u, x_t = untargeted(xb, yb), targeted(xb, tb)
        for j, judge in enumerate(judges):
            correct["Benign"][j] += (predict_labels(judge, xb) == yb).sum()
            correct["Untargeted"][j] += (predict_labels(judge, x_u) == yb).sum()
            pred_t = predict_labels(judge, x_t)
            correct["Targeted"][j] += (pred_t == yb).sum()
            hit[j] += (pred_t == tb).sum()
    rows = {k: (v / len(x)).tolist() for k, v in correct.items()}
    return {"columns": columns, "rows": rows, "target_hit": (hit / len(x)).tolist(), "eps": eps, "steps": steps,
            "source": source, "n": len(x)}


def cw_distortion(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, kappas: Sequence[float] = (0.0, 0.1),
                  c: float = 1.0, steps: int = 1000, lr: float = 0.1, batch_size: int = 100, seed: int = 0) -> dict:
    """Table 5: targeted CW-l2 (torchattacks ``CW`` on :class:`PositiveLogits`, random target labels)
    on the ensemble (through its summed logits, judged by the vote; one column per ``kappa``) and
    on each member alone.

    Per column: ``accuracy`` (the judge still right), ``success`` (the judge says the target) and
    ``distortion`` (mean l2 of the successful examples; nan if none).
    """
    import torchattacks

    net.eval()
    vote = vote_classifier(net)
    cols = [(f"Ensemble kappa={k:g}", vote.surrogate, vote, k) for k in kappas]
    cols += [(f"Model {i + 1}", net.member(i), net.member(i), kappas[0]) for i in range(net.members)]
    target = random_targets(y, net.num_classes, seed)
    out = {}
    for name, attacked, judge, kappa in cols:
        atk = torchattacks.CW(PositiveLogits(attacked), c=c, kappa=kappa, steps=steps, lr=lr)
        atk.set_mode_targeted_by_label(quiet=True)
        right, success, dist = 0, 0, []
        for (xb, yb), tb in zip(_batches(x, y, batch_size, seed), target.split(batch_size)):
            x_adv = atk(xb, tb).detach()
            pred = predict_labels(judge, x_adv)
            right += int((pred == yb).sum())
            ok = pred == tb
            success += int(ok.sum())
            dist.append((x_adv - xb).flatten(1).norm(dim=1)[ok])
        d = torch.cat(dist)
        out[name] = {"accuracy": right / len(x), "success": success / len(x),
                     "distortion": float(d.mean()) if len(d) else math.nan}
    net.zero_grad(set_to_none=True)  # torchattacks' CW backpropagates into the parameters too
    return {"columns": out, "c": c, "steps": steps, "lr": lr, "n": len(x), "targeted": True}


def with_variant(net: nn.Module, variant: str, *, sigma: float = 0.1, samples: int = 20,
                 seed: int | None = None) -> nn.Module:
    """A copy of a DML ensemble with every layer switched to ``variant`` (same weights)."""
    if not _is_dml(net):
        raise ValueError(f"with_variant needs a DMLEnsemble; got {type(net).__name__}")
    return copy.deepcopy(net).set_variant(variant, sigma=sigma, samples=samples, seed=seed).eval()


def rdml_table(net: nn.Module, data, *, dataset: str = "mnist", n: int = 1000, sigma: float = 0.1,
               samples: int = 20, restarts: int = 5, batch_size: int = 250, device="auto",
               progress: bool = True) -> list[RobustnessReport]:
    """Tables 6 and 9: the DML ensemble and the same weights with R-DML layers (eq. 4-5), under
    FGSM, PGD-20 and PGD-40 with ``restarts`` random restarts at the dataset's strong radius."""
    eps = _settings(dataset)["strong"]
    specs = [fgsm_spec(eps), pgd_spec(eps, 20, restarts=restarts), pgd_spec(eps, 40, restarts=restarts)]
    out = []
    for name, model in (("DML ensemble", net), ("R-DML ensemble", with_variant(net, "rdml", sigma=sigma,
                                                                                samples=samples))):
        out.append(evaluate(vote_classifier(model), data, attacks=specs, n=n, batch_size=batch_size, device=device,
                            name=name, dataset=dataset, progress=progress))
    return out


def autoattack_table(net: nn.Module, data, *, dataset: str = "mnist", n: int = 200, name: str = "DML ensemble",
                     batch_size: int = 250, device="auto", progress: bool = True) -> RobustnessReport:
    """Tables 7-8: AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) on the summed logits,
    judged by the vote, at the dataset's three radii, on the first ``n`` examples."""
    specs = [autoattack_spec(eps) for eps in _settings(dataset)["autoattack"]]
    return evaluate(vote_classifier(net), data, attacks=specs, n=n, batch_size=batch_size, device=device, name=name,
                    dataset=dataset, progress=progress)


def certified(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sigmas: Sequence[float] = (0.1, 0.25),
              layer_sigma: float = 0.1, samples: int = 20, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
              n0: int = 100, n: int = 1000, alpha: float = 0.001, seed: int = 0) -> dict:
    """A.9: certified l2 accuracy of the smoothed majority vote (Cohen et al.) at ``radii``, for
    noise ``sigmas``; a DML ensemble is certified with its DML, R-DML and AUG-DML layers (the
    last two at ``layer_sigma``, ``samples`` draws; same weights), any other ensemble as it is."""
    from pyens.ensembles.smoothing import certified_accuracy, certify

    variants = {"DML": net}
    if _is_dml(net):
        variants["R-DML"] = with_variant(net, "rdml", sigma=layer_sigma, samples=samples)
        variants["AUG-DML"] = with_variant(net, "aug", sigma=layer_sigma, samples=samples)
    else:
        variants = {"plain": net}
    out = {}
    for name, model in variants.items():
        for s in sigmas:
            g = torch.Generator().manual_seed(seed)
            pred, radius = certify(vote_classifier(model), x, sigma=s, n0=n0, n=n, alpha=alpha, generator=g)
            out[f"{name}, sigma={s:g}"] = certified_accuracy(pred, radius, y, radii)
    return {"curves": out, "radii": list(radii), "n0": n0, "n": n, "alpha": alpha, "images": len(x),
            "layer_sigma": layer_sigma}


def detection(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, sigma: float = 0.1,
              draws: int = 20, noise: float | None = None, batch_size: int = 250, seed: int = 0) -> dict:
    """A.4 and A.5.1: detect FGSM and PGD-10 examples (crafted on the summed logits from the
    correctly voted benign inputs) by member disagreement and by uncertainty.

    * agreement: ROC/AUC of ``M - agreement`` (every threshold nu at once), and the flag rates
      of the majority and unanimity frameworks on benign and adversarial inputs;
    * uncertainty: a logistic regression on :func:`pyens.ensembles.uncertainty` features,
      negatives = benign and Gaussian-noisy (std ``noise``, default ``eps / 2``) inputs,
      positives = adversarial ones; fitted on the even-indexed examples, ROC/AUC on the odd.
    """
    from pyens.attacks import FGSM, PGD
    from pyens.ensembles.detection import UncertaintyDetector, detect, disagreement, roc, uncertainty

    net.eval()
    vote = vote_classifier(net)
    keep = torch.cat([predict_labels(vote, xb) == yb for xb, yb in _batches(x, y, batch_size, seed)])
    xb_all, yb_all = x[keep], y[keep]
    if len(xb_all) < 4:
        raise ValueError(f"detection needs at least 4 inputs the vote classifies correctly; got {len(xb_all)}")
    noise = eps / 2 if noise is None else noise
    attacks = {"FGSM": FGSM(vote.surrogate, eps=eps),
               "PGD-10": PGD(vote.surrogate, norm="linf", eps=eps, alpha=quick_alpha("linf", eps, 10), steps=10,
                             random_start=True)}

    def logits(t):
        with torch.no_grad():
            return torch.cat([net.member_logits(b) for b in t.split(batch_size)])

    def feats(t):
        return torch.cat([uncertainty(net, b, draws=draws, sigma=sigma, seed=seed) for b in t.split(batch_size)])

    g = torch.Generator().manual_seed(seed)
    x_noisy = (xb_all + noise * torch.randn(xb_all.shape, generator=g)).clamp(0, 1)
    z_benign = logits(xb_all)
    f_neg = torch.cat([feats(xb_all), feats(x_noisy)])
    even = torch.arange(len(f_neg)) % 2 == 0
    out = {"n": int(keep.sum()), "eps": eps, "noise": noise, "sigma": sigma, "draws": draws, "attacks": {}}
    for name, atk in attacks.items():
        x_adv = torch.cat([atk(xb, yb) for xb, yb in _batches(xb_all, yb_all, batch_size, seed)])
        z_adv = logits(x_adv)
        fooled = float((z_adv.sum(1).argmax(-1) != yb_all).float().mean())
        agree = roc(disagreement(z_benign), disagreement(z_adv))
        rates = {nu: {"benign_flagged": float(detect(z_benign, nu=nu).float().mean()),
                      "adversarial_flagged": float(detect(z_adv, nu=nu).float().mean())}
                 for nu in ("majority", "unanimity")}
        f_pos = feats(x_adv)
        pos_even = torch.arange(len(f_pos)) % 2 == 0
        det = UncertaintyDetector().fit(f_neg[even], f_pos[pos_even])
        unc = det.evaluate(f_neg[~even], f_pos[~pos_even])
        out["attacks"][name] = {"agreement": agree, "frameworks": rates, "uncertainty": unc,
                                "vote_fooled": float((predict_labels(vote, x_adv) != yb_all).float().mean()),
                                "sum_fooled": fooled}
    return out


# ---------------------------------------------------------------------------------------------
# the honesty check

def curve_specs(eps: float, *, long: int = 100) -> list[AttackSpec]:
    """FGSM, BIM-10, PGD-10 and PGD-``long`` at one radius (the distortion-accuracy curve's attacks)."""
    return [fgsm_spec(eps), pgd_spec(eps, 10, random_start=False), pgd_spec(eps, 10), pgd_spec(eps, long)]


CURVE_ATTACKS = ("FGSM", "BIM-10", "PGD-10", "PGD-long")


def distortion_curve(net: nn.Module, data, *, dataset: str = "mnist", eps_grid: Sequence[float] | None = None,
                     n: int = 500, long: int = 100, batch_size: int = 250, device="auto", name: str = "model",
                     progress: bool = True) -> dict:
    """Fig. 18: vote accuracy vs linf radius under FGSM, BIM-10, PGD-10 and PGD-``long``.

    Returns ``{"eps": [...], "accuracy": {attack: [...]}, "long": long, "n": n}``; a model that does
    not mask gradients falls towards 0 as eps grows.
    """
    grid = list(_settings(dataset)["curve"] if eps_grid is None else eps_grid)
    acc = {a: [] for a in CURVE_ATTACKS}
    vote = vote_classifier(net)
    for eps in grid:
        if eps == 0:
            x, y = labelled(data, n)
            clean = float(torch.cat([predict_labels(vote, xb) == yb for xb, yb in _batches(x, y, batch_size, 0)])
                          .float().mean())
            for a in CURVE_ATTACKS:
                acc[a].append(clean)
            continue
        rep = evaluate(vote, data, attacks=curve_specs(eps, long=long), n=n, batch_size=batch_size, device=device,
                       name=f"{name} eps {eps:g}", dataset=dataset, progress=progress)
        for a, result in zip(CURVE_ATTACKS, rep.attacks):
            acc[a].append(rep.accuracy(result.name))
    return {"eps": grid, "accuracy": acc, "long": long, "n": n}


def surrogate_check(net: nn.Module, data, *, dataset: str = "mnist", eps: float | None = None, steps: int = 40,
                    n: int = 1000, batch_size: int = 250, device="auto", name: str = "model",
                    progress: bool = True) -> RobustnessReport:
    """PGD-``steps`` at ``eps`` (default: Table 2's) through several surrogates, judged by the vote.

    Rows: the paper's (summed logits, CE), summed logits with the CW margin loss, the averaged
    probability (CE), the soft vote ``sum_m softmax(z_m)`` (a differentiable relaxation of the
    vote, CE) and the straight-through vote (value = vote counts, gradient = summed logits, CE).
    The report's "All linf" row is the per-example best of them.
    """
    eps = _settings(dataset)["small"] if eps is None else eps
    vote = vote_classifier(net)
    rows = [("sum, CE (paper)", vote.surrogate, "ce"), ("sum, margin", vote.surrogate, "margin"),
            ("mean probability, CE", SurrogateScores(net, "prob"), "ce"),
            ("soft vote, CE", SurrogateScores(net, "soft_vote"), "ce"),
            ("straight-through vote, CE", vote, "ce")]
    specs = [pgd_spec(eps, steps, loss=loss, surrogate=s, label=f"PGD-{steps} {label}") for label, s, loss in rows]
    return evaluate(vote, data, attacks=specs, n=n, batch_size=batch_size, device=device, name=name,
                    dataset=dataset, progress=progress)


def cw_check(net: nn.Module, data, *, dataset: str = "mnist", n: int = 100, steps: int = 200,
             batch_size: int = 250, device="auto", name: str = "model", progress: bool = True) -> dict:
    """CW-l2 at the paper's single constant c = 1, vs the ladder c in {1, 10, 100}, vs c = 1 on the
    raw logits as torchattacks runs it (all unbounded).

    Fixed-c CW weighs ``c * margin`` against the squared l2 distortion, so its success depends on
    the logit scale; a model with small logit gaps (a DML's are bounded by the distances between
    its centers) looks robust to it without being so. On raw negative logits torchattacks' CW
    has no classification gradient at all (:class:`PositiveLogits`). Returns accuracies and
    median distortions.
    """
    specs = [cw_spec(1.0, steps), cw_ladder_spec(steps=steps), cw_spec(1.0, steps, shift=False)]
    rep = evaluate(vote_classifier(net), data, attacks=specs, n=n, batch_size=batch_size, device=device, name=name,
                   dataset=dataset, progress=progress)
    out = {"n": rep.n}
    for key, a in zip(("c1", "ladder", "unshifted"), rep.attacks):
        d = a.distance[torch.isfinite(a.distance)]
        out[key] = {"name": a.name, "accuracy": rep.accuracy(a.name),
                    "median_l2": float(d.median()) if len(d) else math.nan}
    return out


def gradient_stats(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 250) -> dict:
    """How often the paper's attack loss (CE of the summed logits) gives no gradient at clean inputs.

    ``zero_grad``: share of examples whose input gradient is exactly 0 (a saturated softmax in
    float32; linf PGD then cannot move); ``saturated``: share with ``p(y) > 1 - 1e-6``.
    """
    from pyens.attacks.losses import ce_loss

    vote = vote_classifier(net)
    zero, sat = 0, 0
    for xb, yb in _batches(x, y, batch_size, 0):
        xb = xb.clone().requires_grad_(True)
        s = vote.surrogate(xb)
        (g,) = torch.autograd.grad(ce_loss(s, yb).sum(), xb)
        zero += int((g.flatten(1).abs().amax(1) == 0).sum())
        sat += int((torch.softmax(s.detach(), -1).gather(1, yb[:, None]).squeeze(1) > 1 - 1e-6).sum())
    return {"zero_grad": zero / len(x), "saturated": sat / len(x), "n": len(x)}


def masking_checks(curve: dict | None = None, surrogates: RobustnessReport | None = None,
                   gradients: dict | None = None, transfer_check: dict | None = None,
                   cw: dict | None = None) -> list[Check]:
    """The honesty check: the sanity checks of :mod:`pyens.eval.sanity` (Athalye et al. 2018;
    Carlini et al. 2019) on what the report measured for one model; a check without its data is
    "not run".

    ``curve``: :func:`distortion_curve`'s (accuracy falls towards 0 at the largest radius and
    does not rise with eps; FGSM not stronger than PGD-10; BIM-10 not much weaker than PGD-10;
    PGD-``long`` not much stronger than PGD-10); ``surrogates``: :func:`surrogate_check`'s
    report; ``gradients``: :func:`gradient_stats`'; ``transfer_check``: :func:`transfer_between`'s
    plus ``"source"``; ``cw``: :func:`cw_check`'s.
    """
    return [falls_towards_zero(curve), monotone_in_radius(_as_radius_curves(curve), attack="each attack"),
            single_step_not_stronger(curve), random_start_not_needed(curve), more_steps_gain_little(curve),
            surrogates_not_stronger(surrogates), zero_gradients_rare(gradients),
            transfer_from_model_not_stronger(transfer_check), cw_constant_not_weaker(cw),
            cw_raw_logits_not_weaker(cw)]


def _as_radius_curves(curve: dict | None) -> Curves | None:
    """The distortion-accuracy curve as :class:`Curves` radius curves, one per attack (what
    :func:`pyens.eval.sanity.monotone_in_radius` reads)."""
    if curve is None:
        return None
    radius = {curve_label(curve, a): {"radii": list(curve["eps"]), "accuracy": values}
              for a, values in curve["accuracy"].items()}
    return Curves(model="", n=curve["n"], clean=math.nan, radius=radius)  # clean: not read by the check


def transfer_between(source: nn.Module, target: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                     steps: int = 10, batch_size: int = 250, seed: int = 0) -> dict:
    """PGD-``steps`` on ``source``'s summed logits vs on ``target``'s own, both judged by ``target``'s vote."""
    from pyens.attacks import PGD

    vs, vt = vote_classifier(source), vote_classifier(target)
    alpha = quick_alpha("linf", eps, steps)
    a_src = PGD(vs.surrogate, norm="linf", eps=eps, alpha=alpha, steps=steps, random_start=True)
    a_tgt = PGD(vt.surrogate, norm="linf", eps=eps, alpha=alpha, steps=steps, random_start=True)
    tr, wb = 0, 0
    for xb, yb in _batches(x, y, batch_size, seed):
        tr += int((predict_labels(vt, a_src(xb, yb)) == yb).sum())
        wb += int((predict_labels(vt, a_tgt(xb, yb)) == yb).sum())
    return {"transfer": tr / len(x), "white_box": wb / len(x), "eps": eps, "steps": steps, "n": len(x)}


# ---------------------------------------------------------------------------------------------
# CLEVER (Fig. 1, A.6)

def clever_table(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, radius: float = 2.0, batches: int = 50,
                 samples: int = 20, pool: int = 5, cw_steps: int = 200, pgd_steps: int = 100,
                 pgd_radii: Sequence[float] = (0.25, 0.5, 0.75, 1.0), batch_size: int = 250,
                 seed: int = 0, dataset: str = "mnist", device="auto", name: str = "model",
                 progress: bool = True) -> dict:
    """Fig. 1 / A.6: CLEVER-u scores (:func:`pyens.eval.clever`, l2, ``radius``) of the
    model that sums the members' logits, per image ``x`` ``[n, C, H, W]`` of label ``y`` ``[n]``,
    beside the smallest l2 distance at which an attack changed the same model's top-1: the
    report's minimum-norm attack (the CW ladder of :func:`cw_ladder_spec`, ``cw_steps`` per
    constant) or l2 PGD (``pgd_steps``, random start) at each radius of ``pgd_radii`` (fractions
    of ``radius``; its distance is the shortest of its successful runs, at most that run's radius).

    CLEVER claims that no perturbation shorter than the score changes the decision; an image
    whose score exceeds a distance an attack actually found (by more than float32 rounding: PGD
    ends on the sphere of its radius, where a capped score sits) is ``flagged`` (the estimate is
    visibly wrong there, e.g. from gradient masking). Returns per-image lists ``score`` (None:
    zero gradient), ``distance`` (the smaller of the two; None: neither found one),
    ``distance_cw``, ``distance_pgd``, ``flagged``, ``label``, and ``counts``
    (:func:`pyens.eval.clever_score.counts`), ``found`` (correctly classified images with a
    distance), ``flagged_count``, ``settings``.
    """
    from pyens.eval.catalogue import pgd_specs
    from pyens.eval.clever_score import clever, counts

    summed = vote_classifier(net).surrogate
    res = clever(summed, x, y, norm="l2", radius=radius, batches=batches, samples=samples, pool=pool, seed=seed,
                 details=True)
    pgd = [next(s for s in pgd_specs(dataset, radii={"l2": f * radius}, steps=pgd_steps, random_start=True)
                if s.norm == "l2") for f in pgd_radii]
    rep = evaluate(summed, (x, y), attacks=[cw_ladder_spec(steps=cw_steps), *pgd], n=len(x), batch_size=batch_size,
                   device=device, name=f"{name} (summed logits)", dataset=dataset, progress=progress, seed=seed)
    cw = rep.attacks[0].distance.double()
    pg = torch.stack([a.distance.double() for a in rep.attacks[1:]]).amin(0)
    dist = torch.minimum(cw, pg)
    found = torch.isfinite(dist) & rep.clean  # a misclassified image scores 0 and needs no attack
    # NaN scores (zero gradient) are counted apart, never flagged
    flagged = found & (res.score > dist * (1 + 1e-4))
    nums = lambda t: [None if not math.isfinite(v) else round(v, 5) for v in t.tolist()]  # noqa: E731
    return {"score": nums(res.score), "distance": nums(dist), "distance_cw": nums(cw), "distance_pgd": nums(pg),
            "flagged": flagged.tolist(), "label": y.tolist(), "counts": counts(res.score), "found": int(found.sum()),
            "flagged_count": int(flagged.sum()),
            "settings": {**res.settings, "attacks": [a.name for a in rep.attacks], "images": len(x),
                         "pgd_radii": [f * radius for f in pgd_radii]}}


# ---------------------------------------------------------------------------------------------
# the report

def dml_report(nets: dict[str, nn.Module], data, *, dataset: str = "mnist", tables: Iterable[str] = TABLES,
               n: int = 1000, budget: str | dict = "quick", device="auto", progress: bool = True,
               log=print) -> dict:
    """Run the DML paper's evaluation on named ensembles (``{"dml": net, "ensemble": net}``).

    ``tables``: any of :data:`TABLES`; ``budget``: ``"quick"`` or ``"paper"`` (:data:`BUDGETS`), or a
    dict of changes to ``"quick"`` (``curve_eps`` also sets the curve's radii).
    Tables that need a DML (``table6``, the R-DML/AUG-DML rows of ``certified``) skip other
    ensembles. The first DML ensemble's honesty check also uses a transfer attack from the first
    non-DML ensemble when there is one. Returns a JSON-ready dict (see
    :func:`pyens.eval.markdown.dml_markdown`); ``"honesty"`` holds each model's
    :func:`masking_checks` as :meth:`pyens.eval.sanity.Check.to_dict` lists.
    """
    tables = list(tables)
    bad = sorted(set(tables) - set(TABLES))
    if bad:
        raise ValueError(f"tables: unknown {bad}; choose from {TABLES}")
    from pyens.training.distributed import resolve_device

    device = resolve_device(device)
    b, s = _budget(budget), _settings(dataset)
    x, y = labelled(data, n)
    for net in nets.values():
        net.to(device).eval()
    x, y = x.to(device), y.to(device)
    out = {"dataset": dataset, "n": len(x), "budget": budget if isinstance(budget, str) else "custom",
           "settings": s, "models": list(nets), "seconds": {}}
    common = dict(dataset=dataset, device=device, progress=progress)

    def timed(key, fn):
        t0 = time.perf_counter()
        log(f"dml-report: {key} ...")
        value = fn()
        out["seconds"][key] = round(time.perf_counter() - t0, 1)
        return value

    if "table2" in tables:
        reps = timed("table2", lambda: table2(nets, data, n=n, cw_steps=b["cw_steps"], **common))
        out["table2"] = [r.to_dict() for r in reps]
    if "transfer" in tables:
        out["transfer"] = timed("transfer", lambda: {name: transfer_table(net, x, y, eps=s["small"])
                                                     for name, net in nets.items()})
    if "table5" in tables:
        k = min(n, b["table5_n"])
        out["table5"] = timed("table5", lambda: {name: cw_distortion(net, x[:k], y[:k], steps=b["table5_steps"])
                                                 for name, net in nets.items()})
    if "table6" in tables:
        k = min(n, b["table6_n"])
        out["table6"] = timed("table6", lambda: {name: [r.to_dict() for r in rdml_table(net, data, n=k, **common)]
                                                 for name, net in nets.items() if _is_dml(net)})
    if "autoattack" in tables:
        out["autoattack"] = timed("autoattack", lambda: [
            autoattack_table(net, data, n=min(n, b["autoattack_n"]), name=name, **common).to_dict()
            for name, net in nets.items()])
    if "certified" in tables:
        k = min(n, b["certify_images"])
        out["certified"] = timed("certified", lambda: {
            name: certified(net, x[:k], y[:k], n0=b["certify_n0"], n=b["certify_n"]) for name, net in nets.items()})
    if "detection" in tables:
        out["detection"] = timed("detection", lambda: {name: detection(net, x, y, eps=s["strong"])
                                                       for name, net in nets.items()})
    if "clever" in tables:
        k = min(n, b["clever_n"])
        sampling = dict(batches=b["clever_batches"], samples=b["clever_samples"], pool=b["clever_pool"])
        models = timed("clever", lambda: {
            name: clever_table(net, x[:k], y[:k], radius=CLEVER_RADIUS, cw_steps=b["cw_steps"],
                               pgd_steps=CLEVER_PGD_STEPS, name=name, **sampling, **common)
            for name, net in nets.items()})
        paper = BUDGETS["paper"]
        ours = dict(clever_n=k, clever_batches=sampling["batches"], clever_samples=sampling["samples"],
                    clever_pool=sampling["pool"], cw_steps=b["cw_steps"])
        label = dict(clever_n="images", clever_batches="batches", clever_samples="samples", clever_pool="pool",
                     cw_steps="CW steps")
        reductions = [f"{label[key]} {v} (paper preset {paper[key]})" for key, v in ours.items() if v < paper[key]]
        out["clever"] = {"radius": CLEVER_RADIUS, "images": k, **sampling, "cw_steps": b["cw_steps"],
                         "pgd_steps": CLEVER_PGD_STEPS,
                         "reductions": reductions, "models": models}
    if "curve" in tables:
        out["curve"] = timed("curve", lambda: {
            name: distortion_curve(net, data, eps_grid=b.get("curve_eps"), n=min(n, b["curve_n"]),
                                   long=b["curve_long"], name=name, **common)
            for name, net in nets.items()})
    if "surrogates" in tables:
        out["surrogates"] = timed("surrogates", lambda: {
            name: surrogate_check(net, data, n=min(n, b["surrogate_n"]), steps=b["surrogate_steps"], name=name,
                                  **common).to_dict()
            for name, net in nets.items()})
        out["gradients"] = {name: gradient_stats(net, x, y) for name, net in nets.items()}
        out["cw_check"] = timed("cw_check", lambda: {
            name: cw_check(net, data, n=min(n, b["cw_ladder_n"]), steps=b["cw_steps"], name=name, **common)
            for name, net in nets.items()})
    if "curve" in tables or "surrogates" in tables:
        dml_names = [k for k, v in nets.items() if _is_dml(v)]
        others = [k for k, v in nets.items() if not _is_dml(v)]
        transfer = {}
        if dml_names and others:
            src, dst = others[0], dml_names[0]
            transfer[dst] = {"source": src, **transfer_between(nets[src], nets[dst], x, y, eps=s["small"])}
        out["transfer_check"] = transfer
        out["honesty"] = {}
        for name in nets:
            surr = out.get("surrogates", {}).get(name)
            checks = masking_checks(out.get("curve", {}).get(name), RobustnessReport.from_dict(surr) if surr else None,
                                    out.get("gradients", {}).get(name), transfer.get(name),
                                    out.get("cw_check", {}).get(name))
            out["honesty"][name] = [c.to_dict() for c in checks]
    return out


def run_dml_report(run_dirs: Sequence[str | Path], *, tables: Iterable[str] = TABLES, n: int = 1000,
                   budget: str | dict = "quick", out: str | Path | None = None, device="auto", progress: bool = True,
                   merge: bool = False, log=print) -> dict:
    """``pyens dml-report``: evaluate trained runs (DML and baseline ensembles) and write
    ``dml_report.json``, ``dml_report.md`` and, with the curve, ``dml_curve.png`` (with CLEVER,
    ``dml_clever.png``) into ``out``
    (default: the first run's directory). ``merge``: add these tables to an existing
    ``dml_report.json`` of the same models and images (tables can be run separately)."""
    import json

    from pyens.data import load
    from pyens.training import load_run

    if not run_dirs:
        raise ValueError("run_dirs: give at least one run directory")
    runs = [load_run(d, device) for d in run_dirs]
    datasets = {r.config.dataset for r in runs}
    if len(datasets) != 1:
        raise ValueError(f"run_dirs: the runs must share one dataset; got {sorted(datasets)}")
    cfg = runs[0].config
    for r in runs:
        if not hasattr(r.model, "member_logits"):
            raise ValueError(f"run_dirs: {r.out} holds a {r.config.method!r} model, not an ensemble")
    nets = {Path(r.out).name: r.model for r in runs}
    if len(nets) != len(runs):
        raise ValueError("run_dirs: two runs share a directory name; the report names models by it")
    data = load(cfg.dataset, "test", data_dir=cfg.data_dir or None)
    out_dir = Path(out) if out else Path(run_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    report = dml_report(nets, data, dataset=cfg.dataset, tables=tables, n=n, budget=budget, device=device,
                        progress=progress, log=log)
    report["runs"] = {name: {"dir": str(r.out), "method": r.config.method, "model": r.config.model,
                             "members": r.config.members, "epochs": r.epoch} for name, r in zip(nets, runs)}
    path = out_dir / "dml_report.json"
    if merge and path.exists():
        old = json.loads(path.read_text())
        if (old.get("models"), old.get("n"), old.get("dataset")) != (report["models"], report["n"], report["dataset"]):
            raise ValueError(f"merge: {path} holds models {old.get('models')} on {old.get('n')} images; "
                             f"this run has {report['models']} on {report['n']}")
        old["seconds"] = {**old.get("seconds", {}), **report.pop("seconds")}
        if any(isinstance(h, dict) for h in old.get("honesty", {}).values()):
            del old["honesty"]  # an older report's free-text verdicts; running curve or surrogates makes the Checks
        report = {**old, **report}
    from pyens.atomic_files import atomic_write_text
    from pyens.eval.plots import plot_clever, plot_dml_curves

    atomic_write_text(json.dumps(report, indent=1), path)  # a later run merges into it
    md = dml_markdown(report)
    atomic_write_text(md, out_dir / "dml_report.md")
    if "curve" in report:
        plot_dml_curves(report["curve"], out_dir / "dml_curve.png")
    if "clever" in report:
        plot_clever(report["clever"], out_dir / "dml_clever.png")
    log(md)
    png = "".join(f" and {f}" for key, f in (("curve", "dml_curve.png"), ("clever", "dml_clever.png"))
                  if key in report)
    log(f"dml-report: written to {out_dir}/dml_report.{{json,md}}{png}")
    return report
