"""What every attack shares: argument checks, the gradient pass, random starts, selection.

Conventions (all attacks):

* A *unit* is what one loss value belongs to: an example (``x: [B, ...]``, loss ``[B]``) or
  an (example, member) pair for MIMO inputs (``x: [B, M, ...]``, loss ``[B, M]``).
* The perturbation ``delta`` has ``x``'s shape; the gradient is taken w.r.t. ``delta`` only
  (``torch.autograd.grad``), so parameter ``.grad`` fields are never touched, and the
  model's train/eval mode is left as it is.
* Every step goes through :func:`pyens.ops.lp_step` (and random starts through
  :func:`pyens.ops.lp_project`): no projection is written here.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pyens.checks import box_arg, choice_arg, integer_labels, positive_int, real_arg
from pyens.ops import lp_project, lp_step
from pyens.ops.lp_step import norm_code
from pyens.ops.contract import L1, L2, LINF, PROJECTIONS

NORM_NAMES = {LINF: "linf", L2: "l2", L1: "l1"}  # norm code -> canonical name


# ---------------------------------------------------------------------------------------------
# argument checks (errors name the argument; the generic ones are pyens.checks')

def check_norm(norm, name: str = "norm") -> str:
    """``"linf"``/inf, ``"l2"``/2, ``"l1"``/1 -> the canonical name."""
    return NORM_NAMES[norm_code(norm, name)]


def per_entry(value, n: int, name: str, what: str, check: Callable) -> list:
    """A scalar broadcast to ``n`` entries, or a length-``n`` sequence; each entry checked."""
    if isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.dim() == 1):
        values = value.tolist() if isinstance(value, torch.Tensor) else list(value)
        if len(values) != n:
            raise ValueError(f"{name} must have one entry per {what} ({n}), got {len(values)}")
        return [check(v, f"{name}[{i}]") for i, v in enumerate(values)]
    return [check(value, name)] * n


def lp_params(norms, eps, alpha, k, n: int | None = None, what: str = "norm") -> tuple[list, list, list, list]:
    """Per-entry ``(norms, eps, alpha, k)`` lists, each entry checked.

    ``n=None`` (MSD): ``norms`` is a non-empty sequence and fixes the count. Otherwise (one
    entry per MIMO member) every argument is a length-``n`` sequence or one value for all.
    """
    if n is None:
        if isinstance(norms, str) or not isinstance(norms, (list, tuple)) or not norms:
            raise ValueError(f"norms must be a non-empty sequence of 'linf'/'l2'/'l1', got {norms!r}")
        n = len(norms)
    return (per_entry(norms, n, "norms", what, check_norm), per_entry(eps, n, "eps", what, real_arg),
            per_entry(alpha, n, "alpha", what, real_arg), per_entry(k, n, "k", what, positive_int))


def check_run(steps, projection, box) -> tuple[int, str, tuple[float, float]]:
    """The arguments every attack takes: ``steps >= 1``, ``projection``, ``box``."""
    return positive_int(steps, "steps"), choice_arg(projection, "projection", PROJECTIONS), box_arg(box)


def check_inputs(x: torch.Tensor, y: torch.Tensor, box, *, members: bool = False):
    """``x: [B, ...]`` with ``y: [B]`` (or ``x: [B, M, ...]`` with ``y: [B, M]``), x in the box.

    Returns detached ``x``, int64 ``y`` and the checked box ``(lo, hi)``.
    """
    box = box_arg(box)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    integer_labels(y, "y")
    lead = 2 if members else 1
    want = "[B, M]" if members else "[B]"
    if x.dim() < lead + 1:
        raise ValueError(f"x must be {'[B, M, ...]' if members else '[B, ...]'} with at least one "
                         f"feature dimension, got shape {tuple(x.shape)}")
    if tuple(y.shape) != tuple(x.shape[:lead]):
        raise ValueError(f"y must be {want} = {tuple(x.shape[:lead])} to match x, got shape {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y must be on x's device {x.device}, got {y.device}")
    if x.device.type == "meta":
        raise ValueError("x must hold data: an attack cannot run on meta tensors")
    if torch.is_inference_mode_enabled() or x.is_inference():
        # set_grad_enabled cannot leave inference mode, so the attack's gradient would fail
        # deep inside autograd; torch.no_grad() is fine.
        raise RuntimeError("attacks need autograd: run them under torch.no_grad(), not "
                           "torch.inference_mode(), and pass x that was not made in inference mode")
    lo, hi = box
    if x.numel():
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite, got NaN or infinity")
        if bool(x.min() < lo) or bool(x.max() > hi):
            raise ValueError(f"x must lie in the box [{lo}, {hi}], got values in "
                             f"[{x.min().item():.6g}, {x.max().item():.6g}]")
    if y.numel() and bool(y.min() < 0):
        # cross_entropy would read -100 as ignore_index: that example would silently go unattacked.
        raise ValueError(f"y must hold class labels >= 0, got {y.min().item()}")
    return x.detach(), y.detach().long(), box


# ---------------------------------------------------------------------------------------------
# forward / gradient

def forward(model: Callable, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor, loss_fn,
            *, requires_grad: bool = True):
    """``model(x + delta)`` and its unit losses, ``delta`` a fresh leaf that requires grad (when
    asked; grad mode is switched on for this even inside ``torch.no_grad()``).

    Returns ``(d, logits, loss)``; ``logits`` must be ``y.shape + (K,)``, ``loss`` is ``y.shape``.
    """
    d = delta.detach().requires_grad_(requires_grad)
    with torch.set_grad_enabled(requires_grad):
        logits = model(x + d)
        if not isinstance(logits, torch.Tensor) or logits.dim() != y.dim() + 1 or logits.shape[:-1] != y.shape:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"model must return logits of shape {tuple(y.shape)} + (K,), got {got}")
        try:
            loss = loss_fn(logits, y)
        except (IndexError, RuntimeError):
            # Checked only on failure: a y.max() on every step would stall the GPU pipeline.
            k = logits.shape[-1]
            if y.numel() and bool(y.max() >= k):
                raise ValueError(f"y must hold class labels in [0, {k}) for the model's {k} classes, "
                                 f"got {y.max().item()}") from None
            raise
        return d, logits, loss


def grad_of(loss: torch.Tensor, d: torch.Tensor, weights: torch.Tensor | None = None, *,
            retain_graph: bool = False) -> torch.Tensor:
    """``∇_d Σ weights * loss`` (weights default to ones): ONE backward pass, zeros where the
    loss does not depend on ``d``. The weighting is the backward's ``grad_outputs``, so no
    graph op is added (and grad mode need not be on)."""
    if not loss.requires_grad:  # no graph at all (a model constant in x, with frozen parameters)
        return torch.zeros_like(d)
    (g,) = torch.autograd.grad(loss, d, torch.ones_like(loss) if weights is None else weights,
                               retain_graph=retain_graph, allow_unused=True, materialize_grads=True)
    return g


def loss_and_grad(model: Callable, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor, loss_fn):
    """One forward and ONE backward of the summed unit losses.

    Returns ``(loss [units], logits, grad [x.shape])`` with ``loss`` and ``logits`` detached.
    """
    d, logits, loss = forward(model, x, delta, y, loss_fn)
    return loss.detach(), logits.detach(), grad_of(loss, d)


def evaluate(model: Callable, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor, loss_fn):
    """One forward, no backward: ``(loss [units], logits)`` at ``x + delta``."""
    _, logits, loss = forward(model, x, delta, y, loss_fn, requires_grad=False)
    return loss, logits


def iterate(grad_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, delta: torch.Tensor,
            steps: int, **step) -> torch.Tensor:
    """``steps`` PGD steps ``delta <- lp_step(delta, grad_fn(delta), x, **step)`` (eq. 1 / eq. 6).

    ``grad_fn`` does the forward and backward pass(es); each step is ONE ``lp_step`` launch
    (for every member at once when ``step`` carries per-member parameters and ``members``).
    """
    for _ in range(steps):
        delta = lp_step(delta, grad_fn(delta), x, **step)
    return delta


# ---------------------------------------------------------------------------------------------
# selection over candidates

def where_units(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``where(mask, a, b)`` with a per-unit mask (``[B]`` or ``[B, M]``) over ``[units, ...]``."""
    return torch.where(mask.view(mask.shape + (1,) * (a.dim() - mask.dim())), a, b)


def keep_max(best: tuple | None, delta: torch.Tensor, loss: torch.Tensor) -> tuple:
    """Per unit, keep ``(delta, loss)`` where ``loss`` is strictly higher (ties keep the earlier)."""
    if best is None:
        return delta, loss
    better = loss > best[1]
    return where_units(better, delta, best[0]), torch.where(better, loss, best[1])


def finish(x: torch.Tensor, delta: torch.Tensor, box: tuple[float, float]) -> torch.Tensor:
    """``x + delta`` clamped to the box (only rounding can leave it) and detached."""
    return (x + delta).clamp_(*box).detach()


# ---------------------------------------------------------------------------------------------
# random start

def _unit_ball_sample(norm: str, rows: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """``[rows, n]`` points drawn uniformly (by volume) from the unit ball of ``norm``.

    linf: i.i.d. U(-1, 1). l2 / l1: a direction uniform on the unit sphere (normalised i.i.d.
    Gaussian resp. Laplace coordinates: their densities depend on the point only through its
    l2 resp. l1 norm) times a radius ``U^(1/n)``, the radius law of the uniform distribution
    on an n-dimensional ball.
    """
    if norm == "linf":
        return torch.empty(rows, n, dtype=like.dtype, device=like.device).uniform_(-1.0, 1.0)
    if norm == "l2":
        s = torch.randn(rows, n, dtype=like.dtype, device=like.device)
        p = 2
    else:
        s = torch.empty(rows, n, dtype=like.dtype, device=like.device).exponential_()
        s = torch.where(torch.rand_like(s) < 0.5, -s, s)
        p = 1
    u = s / s.norm(p=p, dim=1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    r = torch.rand(rows, 1, dtype=like.dtype, device=like.device).pow(1.0 / max(n, 1))
    return u * r


def random_start(x: torch.Tensor, norms: Sequence[str], eps: Sequence[float], box: tuple[float, float],
                 projection: str, members: int | None = None) -> torch.Tensor:
    """A random perturbation in ``B_p(eps) ∩ box`` for each unit (per-member norm and eps).

    ``x: [B, ...]`` (``members=None``, one norm) or ``[B, M, ...]``. Each unit's point is drawn
    uniformly from its lp ball (:func:`_unit_ball_sample` scaled by eps), then projected onto
    ball ∩ box with :func:`pyens.ops.lp_project` (so coordinates pushed out of the box are
    pulled back, and an exact projection keeps as much of the draw as the box allows).
    Uses the global torch RNG (seed it with ``torch.manual_seed`` for reproducible starts).
    """
    b = x.shape[0]
    m = members or 1
    n = x.shape[2:].numel() if members else x.shape[1:].numel()
    delta = torch.empty(b, m, n, dtype=x.dtype, device=x.device)
    for j in range(m):
        # A radius beyond x's dtype would make the draw infinite; the projection below
        # clips it to the box either way.
        delta[:, j] = _unit_ball_sample(norms[j], b, n, x) * min(eps[j], torch.finfo(x.dtype).max / 2)
    per_unit = {"norm": list(norms), "eps": list(eps)} if members else {"norm": norms[0], "eps": eps[0]}
    return lp_project(delta.view(x.shape), x, box=box, projection=projection, members=members, **per_unit)
