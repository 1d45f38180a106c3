"""Robust-accuracy curves (MAT paper Figs. 2-3) and the reference points the sanity checks use.

For each norm: robust accuracy of PGD versus its number of steps (one run, read at each
checkpoint: PGD from ``delta = 0`` is deterministic, so step s of a long run is the result of
an s-step run with the same step size) and versus the radius (one PGD run per radius, step
size scaled with the radius); robust accuracy under random noise of the same norm and radius;
and robust accuracy under an unbounded attack (linf PGD over the whole box), which any model
must fail. Distortion-accuracy curves of minimum-norm attacks come from the per-example
distances a :class:`~pyens.eval.results.RobustnessReport` keeps (:func:`distortion_curve`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pyens.eval.catalogue import NORMS, preset_params, quick_alpha, resolve_radii
from pyens.eval.results import RobustnessReport
from pyens.eval.robustness import labelled, predict_labels, targets

STEP_CHECKPOINTS = (1, 2, 5, 10, 20, 50, 100, 200)
RADIUS_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass
class Curves:
    """Robust accuracy (fractions of the ``n`` examples) along steps, radius and noise.

    Attributes:
        model: label. n: examples. clean: clean accuracy on them.
        steps: norm -> ``{"eps", "alpha", "k", "steps": [...], "accuracy": [...]}``.
        radius: norm -> ``{"eps" (the paper's), "steps", "radii": [...], "accuracy": [...]}``.
        noise: norm -> ``{"eps", "draws", "accuracy"}`` (uniform noise in the ball).
        unbounded: ``{"norm", "eps", "steps", "alpha", "accuracy"}``.
    """

    model: str
    n: int
    clean: float
    steps: dict = field(default_factory=dict)
    radius: dict = field(default_factory=dict)
    noise: dict = field(default_factory=dict)
    unbounded: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Curves:
        return cls(**d)


def _batches(x, y, batch_size, device):
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)


def pgd_steps_curve(attack_model: nn.Module, predict: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                    norm: str, eps: float, alpha: float, checkpoints, k: int = 20,
                    box: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """``[len(checkpoints), B]`` bool: robust (clean-correct and correct) after each number of
    PGD steps, from one run. ``x: [B, C, H, W]``, ``y: [B]``."""
    from pyens.attacks.common import iterate, loss_and_grad
    from pyens.attacks.losses import ce_loss

    clean = predict_labels(predict, x) == y
    delta, done, out = torch.zeros_like(x), 0, []
    grad = lambda d: loss_and_grad(attack_model, x, d, y, ce_loss)[2]  # noqa: E731
    for s in checkpoints:
        delta = iterate(grad, x, delta, s - done, norm=norm, eps=eps, alpha=alpha, k=k, box=box)
        done = s
        out.append(clean & (predict_labels(predict, (x + delta).clamp(*box)) == y))
    return torch.stack(out)


def noise_robust(predict: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, draws: int = 10,
                 box: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """``[B]`` bool: correct on the clean input and on ``draws`` random points of ``B_p(eps) ∩ box``
    (uniform in the ball, then projected into the box)."""
    from pyens.attacks import random_start

    ok = predict_labels(predict, x) == y
    for _ in range(draws):
        delta = random_start(x, [norm], [eps], box, "exact")
        ok &= predict_labels(predict, x + delta) == y
    return ok


def robustness_curves(model, data, *, dataset: str | None = None, eps=None, pgd: str | dict = "quick", n: int = 200,
                      batch_size: int = 250, device: str | torch.device = "auto", name: str = "model",
                      surrogate: nn.Module | None = None, checkpoints=None, fractions=RADIUS_FRACTIONS,
                      noise_draws: int = 10, seed: int = 0, progress: bool = True) -> Curves:
    """Steps and radius curves per norm, noise and unbounded-attack accuracy on ``n`` examples.

    ``pgd``: a preset name or its ``{"pgd_linf": {...}, "pgd_l2": ..., "pgd_l1": ...}``
    parameters (:func:`pyens.eval.preset_params`): the step size, length and k of the PGD.
    The steps curve runs to ``max(200, steps)`` with that step size (``checkpoints`` to
    change it); the radius curve runs ``steps`` steps at ``fraction * eps`` with
    :func:`~pyens.eval.catalogue.quick_alpha` of that radius. The unbounded attack is linf
    PGD with eps = 1 (the whole [0, 1] box). The radii: ``dataset``'s paper radii (default:
    ``data.name``) or ``eps`` (``{norm: radius}``); one of them is needed.
    """
    from pyens.training.distributed import resolve_device

    dataset = dataset or getattr(data, "name", None)
    radii = resolve_radii(dataset, eps)
    x_all, y_all = labelled(data, n)
    device = resolve_device(device)
    predict, attack_model = targets(model, surrogate)
    predict, attack_model = predict.to(device).eval(), attack_model.to(device).eval()
    pgd = preset_params(pgd, dataset, radii=eps) if isinstance(pgd, str) else pgd
    steps = pgd["pgd_linf"]["steps"]
    checkpoints = tuple(checkpoints or [s for s in STEP_CHECKPOINTS if s <= max(200, steps)])
    jobs = len(NORMS) * (2 + len(fractions)) + 2  # + clean + unbounded
    bar = None
    if progress:
        from pyens.progress import progress as progress_display

        bar = progress_display(jobs, f"curves {name}", unit="run")

    def over_batches(fn) -> torch.Tensor:
        torch.manual_seed(seed)
        out = torch.cat([fn(x, y).cpu() for x, y in _batches(x_all, y_all, batch_size, device)], dim=-1)
        if bar is not None:
            bar.update(1)
        return out

    rate = lambda mask: int(mask.sum()) / len(x_all)  # noqa: E731
    from pyens.attacks import PGD

    try:
        clean = over_batches(lambda x, y: predict_labels(predict, x) == y)
        curves = Curves(name, len(x_all), rate(clean))
        for norm, eps in zip(NORMS, radii):
            p = pgd[f"pgd_{norm}"]
            robust = over_batches(lambda x, y: pgd_steps_curve(attack_model, predict, x, y, norm=norm, eps=eps,
                                                                alpha=p["alpha"], checkpoints=checkpoints, k=p["k"]))
            curves.steps[norm] = {"eps": eps, "alpha": p["alpha"], "k": p["k"], "steps": list(checkpoints),
                                  "accuracy": [rate(r) for r in robust]}
            radii = [f * eps for f in fractions]
            accs = []
            for r in radii:
                if r == 0:
                    accs.append(rate(clean))
                    if bar is not None:
                        bar.update(1)
                    continue
                atk = PGD(attack_model, norm=norm, eps=r, alpha=quick_alpha(norm, r, steps), steps=steps, k=p["k"])
                accs.append(rate(over_batches(lambda x, y: (predict_labels(predict, x) == y)
                                              & (predict_labels(predict, atk(x, y)) == y))))
            curves.radius[norm] = {"eps": eps, "steps": steps, "radii": radii, "accuracy": accs}
            curves.noise[norm] = {"eps": eps, "draws": noise_draws, "accuracy": rate(over_batches(
                lambda x, y: noise_robust(predict, x, y, norm=norm, eps=eps, draws=noise_draws)))}
        ub_steps = max(steps, 50)
        atk = PGD(attack_model, norm="linf", eps=1.0, alpha=2.5 / ub_steps, steps=ub_steps)
        curves.unbounded = {"norm": "linf", "eps": 1.0, "steps": ub_steps, "alpha": 2.5 / ub_steps,
                            "accuracy": rate(over_batches(lambda x, y: (predict_labels(predict, x) == y)
                                                          & (predict_labels(predict, atk(x, y)) == y)))}
    finally:
        if bar is not None:
            bar.close()
    return curves


def distortion_curve(report: RobustnessReport, name: str, radii=None) -> tuple[list[float], list[float]]:
    """Robust accuracy of ``report``'s model against the attack ``name`` as a function of the
    allowed distortion r: the fraction of its examples that are clean-correct and whose
    adversarial example (if any) lies farther than r. Read from the per-example distances."""
    a = report.result(name)
    if a.distance is None:
        raise ValueError(f"attack {name!r} kept no per-example distances")
    on = torch.ones_like(report.clean) if a.attacked is None else a.attacked
    d = a.distance[on & report.clean]
    total = max(int(on.sum()), 1)
    if radii is None:  # up to the largest distance found, at most 4 eps (at least 2 eps)
        finite = d[torch.isfinite(d)]
        top = float(finite.max()) if finite.numel() else (a.eps or 1.0)
        if a.eps:
            top = min(max(top, 2 * a.eps), 4 * a.eps)
        radii = torch.linspace(0, top, 101).tolist()
    return list(radii), [int((d > r).sum()) / total for r in radii]
