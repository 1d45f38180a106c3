"""Plain-PyTorch reference of the lp step family (ground truth for tests, baseline for benches).

Everything works on *rows*: ``[R, n]`` tensors where row ``r`` belongs to member
``r % M`` and uses that member's ``norm``/``eps``/``alpha``/``k``.  The public ops in
:mod:`pyens.ops.lp_step` reshape their inputs to rows and call :func:`lp_rows` of the
selected backend; every backend implements exactly the contract written here.

The algorithms are deliberately *different* from the fast kernels (sorting and
100-step bisection over whole rows instead of per-row candidate search), so that a
test comparing the two is a real check, not the same code twice.

Conventions shared by all backends (see ``docs/lp_step.md`` for the reasoning):

* room: ``a_i = min(lo - x_i, 0)``, ``b_i = max(hi - x_i, 0)``; the admissible
  perturbation is ``a <= z <= b``.  For ``x`` inside the box this is exactly
  ``lo <= x + z <= hi``; for ``x`` outside it, ``z = 0`` stays admissible.
* ``sign(0) = 0``; zero-gradient coordinates are never selected by the l1 direction.
* non-finite inputs set bits of the returned flag (1: delta, 2: grad, 4: x); the op
  wrapper turns them into an error naming the argument.
"""
from __future__ import annotations

import torch

from pyens.ops.contract import DIRECTION, L1, L2, LINF, PROJECT, STEP  # noqa: F401  (the op's codes)
from pyens.ops.contract import acc_dtype as _acc_dtype

_BISECT_STEPS = 100  # float64 halves [0, 1] to below any representable gap


def _per_row(values, rows: int, dtype, device) -> torch.Tensor:
    """Member parameters ``[M]`` expanded to one value per row ``[R, 1]`` (row r -> r % M)."""
    v = torch.tensor(list(values), dtype=dtype, device=device)
    reps = -(-rows // len(values)) if rows else 0
    return v.repeat(reps)[:rows].unsqueeze(1)


def room(x: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate admissible perturbation ``[a, b]`` with ``a <= 0 <= b``."""
    return (lo - x).clamp(max=0), (hi - x).clamp(min=0)


def direction_rows(g, x, d, norm, k, lo, hi):
    """Steepest ascent direction ``V_p(g)`` of rows ``[R, n]`` (all rows one norm code)."""
    if norm == LINF:
        return torch.sign(g)
    if norm == L2:
        nrm = g.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return g / nrm
    # l1: the k largest |g| among movable nonzero coordinates, ties to the lowest index.
    p = x + d
    movable = (g != 0) & ~((p >= hi) & (g > 0)) & ~((p <= lo) & (g < 0))
    score = torch.where(movable, g.abs(), torch.full_like(g, -1.0))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(g.shape[1], device=g.device).expand_as(order))
    count = movable.sum(dim=1, keepdim=True)
    ks = torch.minimum(count, k.to(count.dtype))
    chosen = movable & (rank < ks)
    return torch.where(chosen, torch.sign(g) / ks.clamp(min=1).to(g.dtype), torch.zeros_like(g))


def _l2_exact(y, a, b, eps):
    """Largest ``t`` in [0, 1] with ``||clamp(t y, a, b)||_2 <= eps``, applied (docs/ops.md, l2 exact)."""
    c = y.clamp(a, b)
    inside = c.square().sum(1, keepdim=True) <= eps.square()
    lo_t = torch.zeros_like(eps)
    hi_t = torch.ones_like(eps)
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo_t + hi_t)
        ok = (mid * y).clamp(a, b).square().sum(1, keepdim=True) <= eps.square()
        lo_t = torch.where(ok, mid, lo_t)
        hi_t = torch.where(ok, hi_t, mid)
    # Exact finish: on the bracket every coordinate is either free (t*y) or at its bound.
    mid = 0.5 * (lo_t + hi_t)
    free = ((mid * y) > a) & ((mid * y) < b)
    s = torch.where(free, y.square(), 0).sum(1, keepdim=True)
    cl = torch.where(free, 0, (mid * y).clamp(a, b).square()).sum(1, keepdim=True)
    t = ((eps.square() - cl).clamp(min=0) / s.clamp(min=torch.finfo(y.dtype).tiny)).sqrt()
    t = torch.minimum(torch.maximum(t, lo_t), hi_t)
    t = torch.where(s > 0, t, lo_t)
    z = (t * y).clamp(a, b)
    z = torch.where(inside, c, z)
    return torch.where(eps > 0, z, torch.zeros_like(z))


def _l1_exact(y, a, b, eps):
    """Smallest ``lam >= 0`` with ``sum min(max(|y|-lam, 0), r) <= eps``, applied (Croce & Hein 2021)."""
    u = y.abs()
    r = torch.where(y >= 0, b, -a)
    c = torch.sign(y) * torch.minimum(u, r)
    inside = c.abs().sum(1, keepdim=True) <= eps

    def mass(lam):
        return torch.minimum((u - lam).clamp(min=0), r).sum(1, keepdim=True)

    lo_l = torch.zeros_like(eps)
    hi_l = u.amax(1, keepdim=True) if u.shape[1] else torch.zeros_like(eps)
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo_l + hi_l)
        ok = mass(mid) <= eps
        lo_l = torch.where(ok, lo_l, mid)
        hi_l = torch.where(ok, mid, hi_l)
    # Exact finish: on the bracket the mass is C + sum(u_i) - cnt * lam over the linear pieces.
    mid = 0.5 * (lo_l + hi_l)
    linear = (u - mid > 0) & (u - mid < r)
    cnt = linear.sum(1, keepdim=True).to(y.dtype)
    const = torch.where(linear, u, torch.minimum((u - mid).clamp(min=0), r)).sum(1, keepdim=True)
    lam = (const - eps) / cnt.clamp(min=1)
    lam = torch.minimum(torch.maximum(lam, lo_l), hi_l)
    lam = torch.where(cnt > 0, lam, hi_l)
    z = torch.sign(y) * torch.minimum((u - lam).clamp(min=0), r)
    return torch.where(inside, c, z)


def _l1_ball(y, eps):
    """Euclidean projection onto the l1 ball alone (Duchi et al. 2008), rows outside it only."""
    unbounded = torch.full_like(y, float("inf"))
    return _l1_exact(y, -unbounded, unbounded, eps)


def project_rows(y, x, norm, eps, lo, hi, exact):
    """Projection of rows ``y`` onto ``{||z||_p <= eps} ∩ {a <= z <= b}`` (all rows one norm)."""
    a, b = room(x, lo, hi)
    if norm == LINF:
        return torch.minimum(torch.maximum(y, torch.maximum(-eps, a)), torch.minimum(eps, b))
    if norm == L2:
        if exact:
            return _l2_exact(y, a, b, eps)
        nrm = y.norm(dim=1, keepdim=True)
        scale = torch.where(nrm > eps, eps / nrm.clamp(min=torch.finfo(y.dtype).tiny), torch.ones_like(nrm))
        return (y * scale).clamp(a, b)
    if exact:
        return _l1_exact(y, a, b, eps)
    return _l1_ball(y, eps).clamp(a, b)


def _flags(delta, grad, x, mode) -> torch.Tensor:
    # delta is read in every mode (in mode 1 it is the l1 direction's movability mask).
    bits = 0 if bool(torch.isfinite(delta).all()) else 1
    if mode != PROJECT:
        bits |= 0 if bool(torch.isfinite(grad).all()) else 2
    bits |= 0 if bool(torch.isfinite(x).all()) else 4
    return torch.tensor([bits], dtype=torch.int32, device=x.device)


def lp_rows(mode: int, delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor,
            norms, eps, alpha, k, lo: float, hi: float, exact: bool):
    """The kernel contract of every backend.

    Args:
        mode: 0 project ``delta``; 1 steepest direction of ``grad``; 2 full step.
        delta, grad, x: ``[R, n]`` rows of one dtype and device (``grad`` unused in mode 0).
        norms: ``M`` norm codes (0 linf, 1 l2, 2 l1); row ``r`` uses member ``r % M``.
        eps, alpha: ``M`` radii / step sizes (pixel units); k: ``M`` l1 sparsities.
        lo, hi: the box; exact: exact ball ∩ box projection, else ball then box clamp.

    Returns:
        ``(out [R, n] in delta's dtype, flags int32 [1])``.
    """
    rows = x.shape[0]
    acc = _acc_dtype(x.dtype)
    d, g, xx = delta.to(acc), grad.to(acc), x.to(acc)
    eps_r = _per_row(eps, rows, acc, x.device)
    alpha_r = _per_row(alpha, rows, acc, x.device)
    k_r = _per_row(k, rows, torch.int64, x.device)
    norm_r = _per_row(norms, rows, torch.int64, x.device).squeeze(1)
    out = torch.zeros_like(xx)
    for code in sorted(set(int(c) for c in norms)):
        sel = (norm_r == code).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        ds, gs, xs = d[sel], g[sel], xx[sel]
        if mode == PROJECT:
            res = project_rows(ds, xs, code, eps_r[sel], lo, hi, exact)
        else:
            v = direction_rows(gs, xs, ds, code, k_r[sel], lo, hi)
            res = v if mode == DIRECTION else project_rows(ds + alpha_r[sel] * v, xs, code, eps_r[sel], lo, hi, exact)
        out[sel] = res
    return out.to(delta.dtype if mode != DIRECTION else grad.dtype), _flags(delta, grad, x, mode)
