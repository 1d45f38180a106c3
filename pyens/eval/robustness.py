"""``pyens.evaluate``: run a set of attacks on a model, batched, and report per example."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from pyens.eval.report import AttackResult, RobustnessReport

# MAT paper radii (Appendix C) per dataset: (linf, l2, l1).
RADII = {"mnist": (0.3, 2.0, 10.0), "cifar10": (0.03, 0.5, 12.0), "resisc45": (0.03, 0.5, 12.0)}


@dataclass
class AttackSpec:
    """An attack to evaluate: a label, its worst-case group and a factory.

    ``make(model)`` returns a callable ``(x, y) -> x_adv`` for a classifier
    ``model: [B, C, H, W] -> [B, K]``.
    """

    name: str
    group: str
    make: Callable[[nn.Module], Callable]
    params: dict = field(default_factory=dict)


def pgd_specs(dataset: str = "mnist", *, steps: int = 50, k: int = 20, restarts: int = 1,
              random_start: bool = False) -> list[AttackSpec]:
    """PGD linf / l2 / l1 at the paper's radii, with ``alpha = 2.5 eps / steps`` (l1: ``10 eps /
    steps`` capped below by ``eps / 20``, since an l1 step moves only ``alpha`` of mass on k
    coordinates; the paper's 200-step preset uses its training step sizes instead)."""
    from pyens.attacks import PGD

    out = []
    for norm, eps in zip(("linf", "l2", "l1"), RADII[dataset]):
        alpha = 2.5 * eps / steps if norm != "l1" else max(10 * eps / steps, eps / 20)
        params = dict(norm=norm, eps=eps, alpha=alpha, steps=steps, k=k, restarts=restarts,
                      random_start=random_start)
        out.append(AttackSpec(f"PGD {norm} (eps {eps:g}, {steps} steps)", norm,
                              lambda model, p=params: PGD(model, **p), params))
    return out


def _labelled(data, n: int):
    images = getattr(data, "images", None)
    if images is not None:
        return images[:n], data.labels[:n]
    items = [data[i] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])


def evaluate(model: nn.Module, data, *, attacks: list[AttackSpec] | str = "quick", n: int = 1000,
             batch_size: int = 250, device: str | torch.device = "cpu", name: str = "model",
             dataset: str | None = None, progress: bool = True) -> RobustnessReport:
    """Evaluate ``model`` on the first ``n`` examples of ``data`` under ``attacks``.

    Args:
        model: a classifier ``[B, C, H, W] -> [B, K]`` in pixel space (for a MIMO or vanilla
            ensemble, :func:`pyens.training.classifier` of it: the averaged output).
        data: a pyens dataset (or any ``(x, y)`` indexable dataset), or a tuple ``(x, y)``.
        attacks: a list of :class:`AttackSpec`, or ``"quick"`` (PGD linf/l2/l1, 50 steps) /
            ``"paper"`` (200 steps, l1 k = 20).
        n: number of examples (the papers use the first 1000 test images).
        batch_size: examples per attack batch.

    Returns:
        A :class:`RobustnessReport` with per-example results.
    """
    if isinstance(data, tuple):
        x_all, y_all = data[0][:n], data[1][:n]
    else:
        x_all, y_all = _labelled(data, min(n, len(data)))
    ds_name = dataset or getattr(data, "name", "mnist")
    if isinstance(attacks, str):
        if attacks not in ("quick", "paper"):
            raise ValueError(f"attacks must be 'quick', 'paper' or a list of AttackSpec, got {attacks!r}")
        attacks = pgd_specs(ds_name, steps=50) if attacks == "quick" else pgd_specs(ds_name, steps=200)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = torch.device(device)
    model = model.to(device).eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = (len(attacks) + 1) * ((len(x_all) + batch_size - 1) // batch_size)
        bar = tqdm(total=total, desc=f"eval {name}", unit="batch", dynamic_ncols=True)

    def batched(fn) -> torch.Tensor:
        out = []
        for i in range(0, len(x_all), batch_size):
            x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
            out.append(fn(x, y).cpu())
            if bar is not None:
                bar.update(1)
        return torch.cat(out)

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x).argmax(1)

    try:
        clean = batched(lambda x, y: predict(x) == y)
        results = []
        for spec in attacks:
            if bar is not None:
                bar.set_postfix_str(spec.name)
            atk = spec.make(model)
            t0 = time.perf_counter()
            correct = batched(lambda x, y: predict(atk(x, y)) == y)
            results.append(AttackResult(spec.name, spec.group, correct, spec.params, time.perf_counter() - t0))
    finally:
        if bar is not None:
            bar.close()
    meta = {"dataset": ds_name, "n": len(x_all), "device": str(device), "torch": torch.__version__}
    return RobustnessReport(name, clean, results, meta)
