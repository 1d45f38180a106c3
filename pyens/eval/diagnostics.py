"""Training diagnostics of member ensembles.

- Cross-gradient ratio ``||cross|| / ||true||`` per member (MAT Fig. 1):
  :func:`pyens.attacks.cross_gradient_ratio`, logged per epoch by MAT runs.
- Steepest-direction disagreement ``E_p`` (MAT App. D, Fig. 4): the fraction of input entries
  where the steepest direction of MAT's approximate gradient (eq. 6) differs from that of the
  member's true gradient (eq. 5),

      E_p(m) = sum(V_p(∇_{x_m} Σ_j L_j) XOR V_p(∇_{x_m} L_m)) / |x_m|,   p in {1, inf},

  averaged over the batch (an entry "differs" when the two directions' values differ).
- Gradient cosine similarity between members (DML paper Figs. 9-11): per example and per
  pair of members, the cosine between the input gradients of their losses, and between the
  signs of those gradients (what sign-based attacks such as PGD linf use).
"""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import torch
from torch import nn

from pyens.attacks.losses import ce_loss
from pyens.training.run_dir import RunDir


def steepest_disagreement(mimo: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norms=("l1", "linf"),
                          k: int = 20, box: tuple[float, float] = (0.0, 1.0)) -> dict[str, torch.Tensor]:
    """E_p per member for a MIMO network ``mimo(x [B, M, ...]) -> [B, M, K]``, ``y: [B, M]``.

    Returns ``{p: [M]}`` (fractions in [0, 1], detached) for each norm in ``norms``; gradients
    at the clean ``x`` (two gradient computations: eq. 6's one backward, eq. 5's M).
    """
    from pyens.attacks import mimo_gradient
    from pyens.ops import steepest_direction

    m = x.shape[1]
    approx = mimo_gradient(mimo, x, y, gradient="approx", box=box)
    true = mimo_gradient(mimo, x, y, gradient="naive", box=box)
    out = {}
    for p in norms:
        va = steepest_direction(approx, x, norm=p, k=k, box=box, members=m)
        vt = steepest_direction(true, x, norm=p, k=k, box=box, members=m)
        out[p] = (va != vt).flatten(2).float().mean(dim=(0, 2))
    return out


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``∇_x Σ_b CE(model(x_b), y_b)``: ``[B, ...]``, detached (parameter grads untouched)."""
    d = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(ce_loss(model(d), y).sum(), d)
    return g.detach()


def gradient_cosine(members: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-example cosine similarity of the members' input gradients, for every pair.

    ``x: [B, C, H, W]``, ``y: [B]``. Returns ``{"pairs": [(i, j), ...], "grad": [P, B],
    "sign": [P, B]}`` (cosines of the gradients and of their signs; 0 where a gradient is 0).
    """
    grads = [input_gradient(m, x, y).flatten(1) for m in members]
    pairs = list(combinations(range(len(members)), 2))
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)  # noqa: E731
    return {"pairs": pairs,
            "grad": torch.stack([cos(grads[i], grads[j]) for i, j in pairs]) if pairs else torch.empty(0, len(x)),
            "sign": torch.stack([cos(grads[i].sign(), grads[j].sign()) for i, j in pairs]) if pairs
            else torch.empty(0, len(x))}


def epoch_diagnostics(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mimo_inputs=None) -> dict:
    """What a training epoch logs for a member ensemble (JSON-ready):

    - ``steepest_disagreement``: ``{"l1": [M], "linf": [M]}`` (MIMO only; ``mimo_inputs`` =
      the ``(x [B, M, ...], y [B, M])`` batch the cross-gradient ratio uses);
    - ``grad_cosine`` / ``grad_sign_cosine``: the mean over examples per member pair
      (in ``combinations(range(M), 2)`` order).
    """
    out = {}
    if mimo_inputs is not None:
        e = steepest_disagreement(net, *mimo_inputs)
        out["steepest_disagreement"] = {p: [float(v) for v in t] for p, t in e.items()}
    members = [net.member(i) for i in range(net.members)]
    cos = gradient_cosine(members, x, y)
    out["grad_cosine"] = [float(v) for v in cos["grad"].mean(1)]
    out["grad_sign_cosine"] = [float(v) for v in cos["sign"].mean(1)]
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run (``metrics.jsonl``); empty if there are none."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
