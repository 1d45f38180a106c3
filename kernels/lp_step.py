"""Triton kernel of the lp step family: :func:`lp_rows`, one program per row, all members in one launch.

The contract is that of :func:`pyens.reference.lp_step.lp_rows` (the ground truth): rows
``[R, n]``, row ``r`` uses member ``m = r % M``, and per member

* ``mode 0``: ``out = Pi(delta)``, the projection onto ``{||z||_p <= eps} ∩ {a <= z <= b}``;
* ``mode 1``: ``out = V_p(grad)``, the steepest ascent direction;
* ``mode 2``: ``out = Pi(delta + alpha * V_p(grad))``, the MAT inner step, eq. (6) of
  "Resilience to multiple attacks via adversarially trained MIMO ensembles" (MAT), where
  ``grad`` is the gradient of the summed ensemble loss so one backward pass serves all M
  attacks;

with the room ``a_i = min(lo - x_i, 0)``, ``b_i = max(hi - x_i, 0)``.

Design (why it is fast): a program keeps its whole row on chip (``BLOCK =
next_power_of_2(n)`` registers per value), reads ``delta``, ``grad`` and ``x`` once and
writes ``out`` once.  Nothing is sorted: every data-dependent threshold (the l1 top-k cut,
the l1 shrinkage ``lam``, the l2 scale ``t``) is found by a fixed number of bisection
steps, each one a reduction over the row held in registers, on the IEEE bit pattern of the
threshold (non-negative floats order like their integer bits), so the bracket ends on two
adjacent floats whatever the scale; an exact closed-form finish then solves the piecewise
linear (l1) or quadratic (l2) equation on that bracket.

Arithmetic: float64 inputs are computed in float64, all others (float32, float16,
bfloat16) in float32, stored back in the input dtype.  float32 divisions and square roots
use the IEEE-rounded forms (``div_rn``, ``sqrt_rn``) because Triton's plain ones may be
approximate, and the reference rounds exactly.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pyens.ops.contract import DIRECTION, L1, L2, LINF, PROJECT, STEP

__all__ = ["MAX_N", "lp_rows"]

#: Longest row a program holds on chip.  Beyond it the row no longer fits a program's
#: registers (it spills already well before), so the op must pick another backend.
MAX_N = 65536


_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Per accumulation dtype: (tl dtype, tl integer dtype of the same width, bisection steps on
# the bit pattern, bits of +inf, bits of 1.0, smallest normal).  31 (63) halvings shrink any
# bracket inside [0, +inf] of float32 (float64) bit patterns to two neighbours.
_ACC = {
    torch.float32: (tl.float32, tl.int32, 31, 0x7F800000, 0x3F800000, 1.1754943508222875e-38),
    torch.float64: (tl.float64, tl.int64, 63, 0x7FF0000000000000, 0x3FF0000000000000,
                    2.2250738585072014e-308),
}


# ----------------------------------------------------------------------------------------
# scalar helpers
# ----------------------------------------------------------------------------------------
@triton.jit
def _div(x, y, F64: tl.constexpr):
    """``x / y`` rounded to nearest (float32 ``/`` may lower to an approximate division)."""
    if F64:
        res = x / y
    else:
        res = tl.math.div_rn(x, y)
    return res


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    """``sqrt(x)`` rounded to nearest (float32 ``tl.sqrt`` may be the approximate one)."""
    if F64:
        res = tl.sqrt(x)
    else:
        res = tl.math.sqrt_rn(x)
    return res


@triton.jit
def _clamp(v, lo, hi):
    # min(max(.)) in this order is torch.clamp's definition, also when lo > hi.
    return tl.minimum(tl.maximum(v, lo), hi)


@triton.jit
def _sign(v, ACC: tl.constexpr):
    # sign(0) = 0: a zero coordinate never moves (and is never selected by the l1 direction).
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0)).to(ACC)


@triton.jit
def _nonfinite(v):
    """True iff the block holds a NaN or an infinity: ``v * 0`` is 0 for finite v, NaN else."""
    s = tl.sum(v * 0, axis=0)
    return s != s


# ----------------------------------------------------------------------------------------
# steepest direction V_p(g)
# ----------------------------------------------------------------------------------------
@triton.jit
def _l1_topk_direction(g, p, mask, k, lo, hi, ACC: tl.constexpr, IT: tl.constexpr,
                       BITS_ITERS: tl.constexpr, INF_BITS: tl.constexpr, F64: tl.constexpr):
    """Sparse l1 direction: ``sign(g_i) / ks`` on the ``ks = min(k, #movable)`` movable
    coordinates with the largest ``|g_i|`` (ties: lowest index), 0 elsewhere.

    Movable: ``g_i != 0``, not (``x_i + delta_i >= hi`` and ``g_i > 0``), not (``x_i +
    delta_i <= lo`` and ``g_i < 0``) -- the point x + delta, not the clean x, decides.

    The cut is the ks-th largest ``|g|`` among movable coordinates: the largest bit pattern
    ``T`` with ``#{bits(|g_i|) >= T} >= ks``, found by bisection on integers (no sort).
    Coordinates above ``T`` are all taken; of those equal to ``T`` the first
    ``ks - #{> T}`` in index order (inclusive cumsum of the tie mask).
    """
    movable = mask & (g != 0) & ~((p >= hi) & (g > 0)) & ~((p <= lo) & (g < 0))
    # Non-movable coordinates get -1, below every candidate (candidates are >= 0).
    ib = tl.where(movable, tl.abs(g).to(IT, bitcast=True), -1)
    ks = tl.minimum(tl.sum(movable.to(tl.int32), axis=0), k)
    # Invariant: count(ib >= lo_b) >= ks and count(ib >= hi_b) < ks (hi_b is above +inf).
    # With ks = 0 (nothing movable) nothing is ever chosen below, so no special case.
    lo_b = tl.full([], 0, IT)
    hi_b = tl.full([], INF_BITS + 1, IT)
    for _ in range(BITS_ITERS):
        mid_b = lo_b + ((hi_b - lo_b) >> 1)
        take = tl.sum((ib >= mid_b).to(tl.int32), axis=0) >= ks
        lo_b = tl.where(take, mid_b, lo_b)
        hi_b = tl.where(take, hi_b, mid_b)
    above = ib > lo_b
    tie = ib == lo_b
    need = ks - tl.sum(above.to(tl.int32), axis=0)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based rank among the ties
    chosen = above | (tie & (tie_rank <= need))
    share = _div(tl.full([], 1.0, ACC), tl.maximum(ks, 1).to(ACC), F64)
    return tl.where(chosen, _sign(g, ACC) * share, 0.0).to(ACC)


@triton.jit
def _direction(g, p, mask, code, k, lo, hi, ACC: tl.constexpr, IT: tl.constexpr,
               BITS_ITERS: tl.constexpr, INF_BITS: tl.constexpr, F64: tl.constexpr):
    """``V_p(g)``: linf ``sign(g)``; l2 ``g / max(||g||_2, 1e-12)``; l1 sparse top-k."""
    if code == 0:
        v = _sign(g, ACC)
    elif code == 1:
        # The 1e-12 floor turns a zero gradient into a zero direction instead of NaN.
        nrm = _sqrt(tl.sum(g * g, axis=0), F64)
        v = _div(g, tl.maximum(nrm, tl.full([], 1e-12, ACC)), F64)
    else:
        v = _l1_topk_direction(g, p, mask, k, lo, hi, ACC, IT, BITS_ITERS, INF_BITS, F64)
    return v


# ----------------------------------------------------------------------------------------
# projections
# ----------------------------------------------------------------------------------------
@triton.jit
def _l2_ball_box(y, a, b, eps, ACC: tl.constexpr, IT: tl.constexpr, BITS_ITERS: tl.constexpr,
                 ONE_BITS: tl.constexpr, TINY: tl.constexpr, F64: tl.constexpr):
    """Exact l2 ∩ box projection: ``clamp(y, a, b)`` if its norm is <= eps, else
    ``z = clamp(t y, a, b)`` with the largest ``t`` in [0, 1] such that ``||z||_2 <= eps``
    (the KKT solution ``clamp(y / (1 + mu), a, b)`` with ``t = 1 / (1 + mu)``); eps = 0 gives 0.

    ``||clamp(t y, a, b)||`` grows with t, so t is bisected (on its bit pattern, bracket
    ``[feasible, infeasible]``).  On the final bracket each coordinate is either free
    (``t y_i`` strictly inside ``(a_i, b_i)``) or at a bound, so ``t^2 S + C = eps^2`` with
    ``S = sum_free y_i^2``, ``C = sum_bound clamp^2`` gives ``t = sqrt((eps^2 - C) / S)``,
    kept in the bracket; if rounding makes it infeasible the feasible end is used.
    """
    c = _clamp(y, a, b)
    eps2 = eps * eps
    z = c
    if tl.sum(c * c, axis=0) > eps2:
        lo_b = tl.full([], 0, IT)  # t = 0 gives z = 0: feasible
        hi_b = tl.full([], ONE_BITS, IT)  # t = 1 gives c: infeasible here
        for _ in range(BITS_ITERS):
            mid_b = lo_b + ((hi_b - lo_b) >> 1)
            zm = _clamp(mid_b.to(ACC, bitcast=True) * y, a, b)
            ok = tl.sum(zm * zm, axis=0) <= eps2
            lo_b = tl.where(ok, mid_b, lo_b)
            hi_b = tl.where(ok, hi_b, mid_b)
        t_lo = lo_b.to(ACC, bitcast=True)
        t_hi = hi_b.to(ACC, bitcast=True)
        ty = (0.5 * (t_lo + t_hi)) * y
        free = (ty > a) & (ty < b)
        zb = _clamp(ty, a, b)
        s = tl.sum(tl.where(free, y * y, 0.0), axis=0)
        cl = tl.sum(tl.where(free, 0.0, zb * zb), axis=0)
        t = _sqrt(_div(tl.maximum(eps2 - cl, 0.0), tl.maximum(s, tl.full([], TINY, ACC)), F64), F64)
        t = tl.minimum(tl.maximum(t, t_lo), t_hi)
        t = tl.where(s > 0, t, t_lo)
        z = _clamp(t * y, a, b)
        z_lo = _clamp(t_lo * y, a, b)
        z = tl.where(tl.sum(z * z, axis=0) <= eps2, z, z_lo)
        # eps = 0: a squared tiny t*y can underflow to a "feasible" 0, but only z = 0 is.
        z = tl.where(eps > 0, z, 0.0).to(ACC)
    return z


@triton.jit
def _l1_ball_box(y, r, eps, ACC: tl.constexpr, IT: tl.constexpr, BITS_ITERS: tl.constexpr,
                 F64: tl.constexpr):
    """Exact l1 ∩ box projection (Croce & Hein 2021, "Mind the box: l1-APGD for sparse
    adversarial attacks on image classifiers"):
    ``z_i = sign(y_i) min(max(|y_i| - lam, 0), r_i)`` with ``r_i`` the room in the direction
    of ``y_i`` and the smallest ``lam >= 0`` giving ``||z||_1 <= eps``; a row already inside
    (``||clamp(y)||_1 <= eps``) is returned clamped, i.e. unchanged when admissible.
    With ``r = +inf`` this is the l1-ball projection of Duchi et al. 2008, "Efficient
    projections onto the l1-ball for learning in high dimensions".

    The mass ``m(lam) = sum min(max(|y_i| - lam, 0), r_i)`` is non-increasing, so lam is
    bisected on its bit pattern in ``[0, max |y|]``.  On the final bracket the mass is linear:
    ``m = K + sum_lin |y_i| - cnt * lam`` over the ``cnt`` coordinates strictly between
    their kinks, giving ``lam = (K + sum_lin |y_i| - eps) / cnt``, kept in the bracket; if
    rounding makes it infeasible the feasible (upper) end is used.  lam is a float of the
    accumulation dtype, so ``||z||_1`` lands within ``cnt * ulp(lam)`` below eps.
    """
    u = tl.abs(y)
    sg = _sign(y, ACC)
    cu = tl.minimum(u, r)
    z = sg * cu
    if tl.sum(cu, axis=0) > eps:
        lo_b = tl.full([], 0, IT)  # lam = 0: mass = ||clamp(y)||_1 > eps, infeasible
        hi_b = tl.max(u, axis=0).to(IT, bitcast=True)  # lam = max|y|: mass 0, feasible
        for _ in range(BITS_ITERS):
            mid_b = lo_b + ((hi_b - lo_b) >> 1)
            mass = tl.sum(tl.minimum(tl.maximum(u - mid_b.to(ACC, bitcast=True), 0.0), r), axis=0)
            ok = mass <= eps
            lo_b = tl.where(ok, lo_b, mid_b)
            hi_b = tl.where(ok, mid_b, hi_b)
        l_lo = lo_b.to(ACC, bitcast=True)
        l_hi = hi_b.to(ACC, bitcast=True)
        um = u - 0.5 * (l_lo + l_hi)
        lin = (um > 0) & (um < r)
        cnt = tl.sum(lin.to(tl.int32), axis=0)
        const = tl.sum(tl.where(lin, u, tl.minimum(tl.maximum(um, 0.0), r)), axis=0)
        lam = _div(const - eps, tl.maximum(cnt, 1).to(ACC), F64)
        lam = tl.minimum(tl.maximum(lam, l_lo), l_hi)
        lam = tl.where(cnt > 0, lam, l_hi)
        z = sg * tl.minimum(tl.maximum(u - lam, 0.0), r)
        z_hi = sg * tl.minimum(tl.maximum(u - l_hi, 0.0), r)
        z = tl.where(tl.sum(tl.abs(z), axis=0) <= eps, z, z_hi).to(ACC)
    return z


@triton.jit
def _project(y, a, b, code, eps, EXACT: tl.constexpr, ACC: tl.constexpr, IT: tl.constexpr,
             BITS_ITERS: tl.constexpr, ONE_BITS: tl.constexpr, TINY: tl.constexpr,
             F64: tl.constexpr):
    """Projection of ``y`` onto ``{||z||_p <= eps} ∩ {a <= z <= b}`` (exact), or ball then
    box clamp (``EXACT = False``, the torchattacks / MSD convention)."""
    if code == 0:
        # The linf ball and the box are both boxes: their intersection's projection is a clamp.
        z = _clamp(y, tl.maximum(-eps, a), tl.minimum(eps, b))
    elif code == 1:
        if EXACT:
            z = _l2_ball_box(y, a, b, eps, ACC, IT, BITS_ITERS, ONE_BITS, TINY, F64)
        else:
            nrm = _sqrt(tl.sum(y * y, axis=0), F64)
            scale = tl.where(nrm > eps, _div(eps, tl.maximum(nrm, tl.full([], TINY, ACC)), F64), 1.0)
            z = _clamp(y * scale, a, b)
    else:
        if EXACT:
            # Room in the direction of y_i (y_i = 0 stays 0 whatever r_i).
            z = _l1_ball_box(y, tl.where(y >= 0, b, -a), eps, ACC, IT, BITS_ITERS, F64)
        else:
            unbounded = tl.full(y.shape, float("inf"), ACC)
            z = _clamp(_l1_ball_box(y, unbounded, eps, ACC, IT, BITS_ITERS, F64), a, b)
    return z


# ----------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------
@triton.jit
def _lp_rows_kernel(delta_ptr, grad_ptr, x_ptr, out_ptr, flags_ptr, norm_ptr, k_ptr, eps_ptr,
                    alpha_ptr, box_ptr, n, members, MODE: tl.constexpr, EXACT: tl.constexpr,
                    ACC: tl.constexpr, IT: tl.constexpr, BITS_ITERS: tl.constexpr,
                    INF_BITS: tl.constexpr, ONE_BITS: tl.constexpr, TINY: tl.constexpr,
                    F64: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row ``r``; member ``m = r % members`` picks norm, k, eps, alpha.

    MAT eq. (6): ``delta <- Pi_{B_p(eps_m) ∩ box}(delta + alpha_m V_p(grad))`` (MODE 2),
    or its two halves alone (MODE 0: Pi(delta), MODE 1: V_p(grad)).
    """
    row = tl.program_id(0)
    member = row % members
    code = tl.load(norm_ptr + member)
    base = row.to(tl.int64) * n  # R * n may exceed 2**31
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    # Padding lanes read 0 everywhere: they add 0 to every sum and are never movable.
    d = tl.load(delta_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    lo = tl.load(box_ptr)
    hi = tl.load(box_ptr + 1)

    bad = tl.where(_nonfinite(d), 1, 0) | tl.where(_nonfinite(x), 4, 0)
    if MODE != 0:
        g = tl.load(grad_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        bad = bad | tl.where(_nonfinite(g), 2, 0)
        v = _direction(g, x + d, mask, code, tl.load(k_ptr + member), lo, hi, ACC, IT,
                       BITS_ITERS, INF_BITS, F64)
    # One atomic per bad row only: the common all-finite case never touches the flag.
    if bad != 0:
        tl.atomic_or(flags_ptr, bad)

    if MODE == 1:
        res = v
    else:
        if MODE == 0:
            y = d
        else:
            y = d + tl.load(alpha_ptr + member) * v
        # Room: a <= 0 <= b always, so z = 0 stays admissible even for x outside the box.
        a = tl.minimum(lo - x, 0.0)
        b = tl.maximum(hi - x, 0.0)
        res = _project(y, a, b, code, tl.load(eps_ptr + member), EXACT, ACC, IT, BITS_ITERS,
                       ONE_BITS, TINY, F64)
    tl.store(out_ptr + base + offs, res.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# host launcher
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _params(norms, k, eps, alpha, lo, hi, acc, device):
    """Member parameters as device tensors, cached: a PGD loop calls with the same lists
    hundreds of times, and each fresh ``torch.tensor(..., device=cuda)`` is a host copy."""
    return (torch.tensor(norms, dtype=torch.int32, device=device),
            torch.tensor(k, dtype=torch.int32, device=device),
            torch.tensor(eps, dtype=acc, device=device),
            torch.tensor(alpha, dtype=acc, device=device),
            torch.tensor([lo, hi], dtype=acc, device=device))


def _check(mode, delta, grad, x, norms, eps, alpha, k, lo, hi):
    if mode not in (PROJECT, DIRECTION, STEP):
        raise ValueError(f"lp_rows: mode must be 0, 1 or 2, got {mode}")
    if x.dim() != 2:
        raise ValueError(f"lp_rows: x must be 2-D [rows, n], got {x.dim()}-D")
    for name, t in (("delta", delta), ("grad", grad)):
        if t.shape != x.shape:
            raise ValueError(f"lp_rows: {name} must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError("lp_rows: delta, grad and x must share a dtype, "
                             f"got {name} {t.dtype}, x {x.dtype}")
        if t.device != x.device:
            raise ValueError("lp_rows: delta, grad and x must be on one device, "
                             f"got {name} {t.device}, x {x.device}")
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"lp_rows: dtype must be float16, bfloat16, float32 or float64, got {x.dtype}")
    m = len(norms)
    if m < 1:
        raise ValueError("lp_rows: norms must have at least one entry")
    for name, seq in (("eps", eps), ("alpha", alpha), ("k", k)):
        if len(seq) != m:
            raise ValueError(f"lp_rows: {name} must have {m} entries, got {len(seq)}")
    for i in range(m):
        if norms[i] not in (LINF, L2, L1):
            raise ValueError(f"lp_rows: norms[{i}] must be 0 (linf), 1 (l2) or 2 (l1), got {norms[i]}")
        if not eps[i] >= 0:  # also rejects NaN; eps = inf means box only
            raise ValueError(f"lp_rows: eps[{i}] must be >= 0, got {eps[i]}")
        if not 0 <= alpha[i] < float("inf"):
            raise ValueError(f"lp_rows: alpha[{i}] must be finite and >= 0, got {alpha[i]}")
        if k[i] < 1:
            raise ValueError(f"lp_rows: k[{i}] must be >= 1, got {k[i]}")
    if not (lo <= hi and abs(lo) < float("inf") and abs(hi) < float("inf")):
        raise ValueError(f"lp_rows: box must satisfy lo <= hi (finite), got ({lo}, {hi})")


def lp_rows(mode: int, delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor,
            norms, eps, alpha, k, lo: float, hi: float, exact: bool):
    """Triton backend of the lp step contract (:func:`pyens.reference.lp_step.lp_rows`).

    Args:
        mode: 0 project ``delta``; 1 steepest direction of ``grad``; 2 full step
            ``Pi(delta + alpha * V_p(grad))`` (MAT eq. 6).
        delta, grad, x: ``[R, n]`` rows of one dtype (float16, bfloat16, float32, float64)
            and device, ``n <= MAX_N``; ``grad`` is not read in mode 0, ``delta`` is read in
            every mode (in mode 1 for the l1 movability mask).
        norms: ``M`` norm codes (0 linf, 1 l2, 2 l1); row ``r`` uses member ``r % M``.
        eps, alpha: ``M`` radii / step sizes (pixel units); k: ``M`` l1 sparsities (>= 1).
        lo, hi: the box; exact: exact ball ∩ box projection, else ball then box clamp.

    Returns:
        ``(out [R, n] in delta's dtype (grad's in mode 1), flags int32 [1])``; flag bits:
        1 non-finite delta, 2 non-finite grad (modes 1, 2), 4 non-finite x.  Values of a
        row with a non-finite input are unspecified.

    Raises:
        ValueError: a row longer than :data:`MAX_N`, or arguments breaking the contract.
    """
    _check(mode, delta, grad, x, norms, eps, alpha, k, lo, hi)
    rows, n = x.shape
    if n > MAX_N:
        raise ValueError(f"lp_rows (triton): row length n={n} exceeds MAX_N={MAX_N}; "
                         "use the cuda, cpu or reference backend")
    out = torch.empty((rows, n), dtype=grad.dtype if mode == DIRECTION else delta.dtype,
                      device=x.device)
    flags = torch.zeros(1, dtype=torch.int32, device=x.device)
    if rows == 0 or n == 0:
        return out, flags
    delta, grad, x = delta.contiguous(), grad.contiguous(), x.contiguous()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc_tl, int_tl, iters, inf_bits, one_bits, tiny = _ACC[acc]
    norm_t, k_t, eps_t, alpha_t, box_t = _params(
        tuple(int(c) for c in norms), tuple(min(int(v), 2**31 - 1) for v in k),
        tuple(float(v) for v in eps), tuple(float(v) for v in alpha), float(lo), float(hi),
        acc, x.device)
    block = triton.next_power_of_2(n)
    # More warps for long rows: the row is split across the threads' registers; short rows
    # keep few warps so the ~30-60 cross-warp reductions per row stay cheap.
    num_warps = min(16, max(1, block // 512))
    # No FMA contraction: ``delta + alpha * v`` and the sums round like the reference's.
    launch = dict(MODE=int(mode), EXACT=bool(exact), ACC=acc_tl, IT=int_tl, BITS_ITERS=iters,
                  INF_BITS=inf_bits, ONE_BITS=one_bits, TINY=tiny, F64=acc == torch.float64,
                  BLOCK=block, num_warps=num_warps, enable_fp_fusion=False)
    args = (delta, grad, x, out, flags, norm_t, k_t, eps_t, alpha_t, box_t, n, len(norms))
    if x.is_cuda:
        with torch.cuda.device(x.device):  # Triton launches on the current device's stream
            _lp_rows_kernel[(rows,)](*args, **launch)
    else:
        _lp_rows_kernel[(rows,)](*args, **launch)
    return out, flags
