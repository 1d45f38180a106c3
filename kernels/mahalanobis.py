"""Triton kernels of the Mahalanobis distance map (DML paper, eq. 2 and 4-5) and their launchers.

The contract is that of :mod:`pyens.reference.mahalanobis` (the ground truth):

    d[b, e, c] = sqrt(||F_e (x_b - centers[e, c])||^2 + eps),   F_e = diag / tril / full(P_e)

Algorithm (as in the compiled backends): the points are transformed first with GEMMs
(``torch.matmul``: cuBLAS on a GPU), ``ut[e, :, b] = F_e x_b`` ``[E, N, B]`` and
``v[e, c, :] = F_e c`` ``[E, C, N]``; then

* :func:`_distances_kernel` (one program per ``(b-tile, c-tile, e)``) sums
  ``(ut - v)^2`` over n chunks in the difference form (which does not cancel like the
  expansion ``||u||^2 + ||v||^2 - 2 u.v``);
* :func:`_distances_backward_kernel` is the whole distance backward in ONE launch: programs
  ``pid < tiles_b`` make ``dut[e, n-tile, b-tile] = sum_c w (ut - v)``, the others
  ``dv[e, c-tile, n-tile] = -sum_b w (ut - v)``, with ``w = grad / d`` formed on the fly;
  the GEMMs ``dx = F^T dut``, ``dcenters = F^T dv``, ``dF = dut x^T + dv^T c`` follow;
* close pairs, ``||u - v||^2 < CLOSE (||u||^2 + ||v||^2)``, are redone from the difference
  ``y = F (x_b - c)`` with torch ops (:func:`_close_pairs`): ``u`` and ``v`` are rounded
  separately, so their difference alone is inaccurate there (as in the compiled backends);
* :func:`_noise_kernel` regenerates the randomized DML's draws from the seed: Philox4x32-10
  (``tl.randint4x``, counter = flat index into ``[T, E, N, N]`` / 4) and a Box-Muller
  transform written with correctly rounded float32 operations only, bit-identical to the C++
  and reference implementations.  ``[T, E, N, N]`` is never stored: each sample's perturbed
  factor ``F + sigma Z_t`` is made when it is needed, in the forward and again in the backward.

Arithmetic: float64 in float64; float32, float16 and bfloat16 in float32 (the driver upcasts),
distances and gradients returned in the input dtype by the op.  The kernels launch with
``enable_fp_fusion=False`` where the noise is made (no FMA contraction: the noise must round
like the other backends').  float32 square roots and divisions use the round-to-nearest forms
(``sqrt_rn``, ``div_rn``; Triton's plain ones may be approximate), and ``eps``, ``scale`` and
``sigma`` reach the kernels as one-element tensors in the accumulation dtype: a Python float
argument is float32 in a compiled kernel (float64 only in the interpreter), which would make
float64 results carry fp32(sigma).  Offsets are int64 (``E * N * B`` passes 2^31 for large
batches); the grids' y and z extents are checked against CUDA's 65535.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pyens.kernels.lp_step import _div, _sqrt
from pyens.ops.contract import DIAG, TRIL, acc_dtype
from pyens.reference.mahalanobis import dense_factor, transformed

CLOSE = 0.0625  # kClose of csrc/mahalanobis.h: pairs closer than this (relative) are recomputed

__all__ = ["forward", "backward", "rforward", "rbackward", "noise"]

_BB, _BC, _BN = 16, 16, 16  # b, c and n tile sizes: a [16, 16, 16] difference block per step
_GRID_YZ = 65535  # CUDA's limit on a grid's y and z extents
_NOISE_BLOCK = 1024

# float32 constants of the noise transform (exact; the same hex values as csrc/mahalanobis.h)
_SQRT2 = tl.constexpr(float.fromhex("0x1.6a09e6p+0"))
_LN2 = tl.constexpr(float.fromhex("0x1.62e430p-1"))
_HALF_PI = tl.constexpr(float.fromhex("0x1.921fb6p+0"))
_L1, _L2, _L3 = (tl.constexpr(float.fromhex(h)) for h in ("0x1.555556p-2", "0x1.99999ap-3", "0x1.24924ap-3"))
_L4, _L5, _L6 = (tl.constexpr(float.fromhex(h)) for h in ("0x1.c71c72p-4", "0x1.745d18p-4", "0x1.3b13b2p-4"))
_S1, _S2, _S3, _S4 = (tl.constexpr(float.fromhex(h)) for h in
                      ("-0x1.555556p-3", "0x1.111112p-7", "-0x1.a01a02p-13", "0x1.71de3ap-19"))
_C1, _C2, _C3, _C4, _C5 = (tl.constexpr(float.fromhex(h)) for h in
                           ("-0x1.000000p-1", "0x1.555556p-5", "-0x1.6c16c2p-10", "0x1.a01a02p-16",
                            "-0x1.27e4fcp-22"))


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _distances_kernel(ut, v, d, B, C, N, E, eps_ptr, BB: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr,
                      F64: tl.constexpr):
    """``d[b, e, c] = sqrt(sum_n (ut[e, n, b] - v[e, c, n])^2 + eps)``."""
    # int64 indices from the start: products such as e * N * B or n * B pass 2^31.
    pid_b, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    e = tl.program_id(2).to(tl.int64)
    eps = tl.load(eps_ptr)
    ob = pid_b * BB + tl.arange(0, BB)
    oc = pid_c * BC + tl.arange(0, BC)
    mb, mc = ob < B, oc < C
    acc = tl.zeros((BB, BC), dtype=ut.dtype.element_ty)
    for n0 in range(0, N, BN):
        on = n0 + tl.arange(0, BN).to(tl.int64)
        mn = on < N
        u = tl.load(ut + e * N * B + on[None, :] * B + ob[:, None], mask=mb[:, None] & mn[None, :], other=0.0)
        vv = tl.load(v + (e * C + oc[:, None]) * N + on[None, :], mask=mc[:, None] & mn[None, :], other=0.0)
        z = u[:, None, :] - vv[None, :, :]
        acc += tl.sum(z * z, axis=2)
    tl.store(d + (ob[:, None] * E + e) * C + oc[None, :], _sqrt(acc + eps, F64), mask=mb[:, None] & mc[None, :])


@triton.jit
def _weights(g, d, ob, oc, mb, mc, e, E, C, scale, F64: tl.constexpr):
    """``w[b, c] = scale * g / d`` (0 where d = 0 and outside the tile) for one member."""
    off = (ob[:, None] * E + e) * C + oc[None, :]
    m = mb[:, None] & mc[None, :]
    dd = tl.load(d + off, mask=m, other=0.0)
    gg = tl.load(g + off, mask=m, other=0.0)
    return tl.where(dd == 0.0, 0.0, _div(scale * gg, tl.where(dd == 0.0, 1.0, dd), F64))


@triton.jit
def _distances_backward_kernel(ut, v, g, d, dut, dv, B, C, N, E, scale_ptr, tiles_b,
                               BB: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, F64: tl.constexpr):
    """One launch: ``dut`` tiles (programs ``pid < tiles_b``), then ``dv`` tiles."""
    pid, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    e = tl.program_id(2).to(tl.int64)
    scale = tl.load(scale_ptr)
    on = pid_n * BN + tl.arange(0, BN)
    mn = on < N
    if pid < tiles_b:
        ob = pid * BB + tl.arange(0, BB)
        mb = ob < B
        u = tl.load(ut + e * N * B + on[None, :] * B + ob[:, None], mask=mb[:, None] & mn[None, :], other=0.0)
        acc = tl.zeros((BB, BN), dtype=ut.dtype.element_ty)
        for c0 in range(0, C, BC):
            oc = c0 + tl.arange(0, BC).to(tl.int64)
            mc = oc < C
            w = _weights(g, d, ob, oc, mb, mc, e, E, C, scale, F64)
            vv = tl.load(v + (e * C + oc[:, None]) * N + on[None, :], mask=mc[:, None] & mn[None, :], other=0.0)
            acc += tl.sum(w[:, :, None] * (u[:, None, :] - vv[None, :, :]), axis=1)
        tl.store(dut + e * N * B + on[None, :] * B + ob[:, None], acc, mask=mb[:, None] & mn[None, :])
    else:
        oc = (pid - tiles_b) * BC + tl.arange(0, BC)
        mc = oc < C
        vv = tl.load(v + (e * C + oc[:, None]) * N + on[None, :], mask=mc[:, None] & mn[None, :], other=0.0)
        acc = tl.zeros((BC, BN), dtype=ut.dtype.element_ty)
        for b0 in range(0, B, BB):
            ob = b0 + tl.arange(0, BB).to(tl.int64)
            mb = ob < B
            w = _weights(g, d, ob, oc, mb, mc, e, E, C, scale, F64)
            u = tl.load(ut + e * N * B + on[None, :] * B + ob[:, None], mask=mb[:, None] & mn[None, :], other=0.0)
            acc -= tl.sum(w[:, :, None] * (u[:, None, :] - vv[None, :, :]), axis=0)
        tl.store(dv + (e * C + oc[:, None]) * N + on[None, :], acc, mask=mc[:, None] & mn[None, :])


@triton.jit
def _box_muller(r0, r1):
    """Two standard normals from two uint32 draws, one rounding per float32 operation."""
    u1 = ((r0 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23: (0, 1), exact
    u2 = ((r1 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    bits = u1.to(tl.uint32, bitcast=True)
    ex = (bits >> 23).to(tl.int32) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > _SQRT2
    m = tl.where(big, m * 0.5, m)
    ex = tl.where(big, ex + 1, ex)
    s = tl.math.div_rn(m - 1.0, m + 1.0)
    s2 = s * s
    p = _L5 + s2 * _L6
    p = _L4 + s2 * p
    p = _L3 + s2 * p
    p = _L2 + s2 * p
    p = _L1 + s2 * p
    p = 1.0 + s2 * p
    logu = ex.to(tl.float32) * _LN2 + (s + s) * p
    r = tl.math.sqrt_rn(logu * -2.0)
    vq = u2 * 4.0
    q = vq.to(tl.int32)  # vq >= 0: truncation is floor
    f = vq - q.to(tl.float32)
    swap = f >= 0.5
    a = tl.where(swap, 1.0 - f, f) * _HALF_PI
    a2 = a * a
    ps = _S3 + a2 * _S4
    ps = _S2 + a2 * ps
    ps = _S1 + a2 * ps
    sn0 = a + (a * a2) * ps
    pc = _C4 + a2 * _C5
    pc = _C3 + a2 * pc
    pc = _C2 + a2 * pc
    pc = _C1 + a2 * pc
    cs0 = 1.0 + a2 * pc
    sn = tl.where(swap, cs0, sn0)
    cs = tl.where(swap, sn0, cs0)
    sin_t = tl.where(q == 0, sn, tl.where(q == 1, cs, tl.where(q == 2, -sn, -cs)))
    cos_t = tl.where(q == 0, cs, tl.where(q == 1, -sn, tl.where(q == 2, -cs, sn)))
    return r * cos_t, r * sin_t


@triton.jit
def _noise_kernel(F, out, seed, base, M, sigma_ptr, PERTURB: tl.constexpr, BLOCK: tl.constexpr):
    """``out[i] = F[i] + sigma * z[base + i]`` (PERTURB) or ``z[base + i]``, ``i < M``: element
    ``j`` of the noise is lane ``j % 4`` of the Box-Muller values of Philox counter ``j // 4``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    idx = base + offs
    r0, r1, r2, r3 = tl.randint4x(seed, idx >> 2)
    z0, z1 = _box_muller(r0, r1)
    z2, z3 = _box_muller(r2, r3)
    lane = idx & 3
    z = tl.where(lane == 0, z0, tl.where(lane == 1, z1, tl.where(lane == 2, z2, z3)))
    if PERTURB:
        f = tl.load(F + offs, mask=mask, other=0.0)
        sigma = tl.load(sigma_ptr)  # F's dtype: sigma * z rounds once in it, as on the other backends
        tl.store(out + offs, f + sigma * z.to(f.dtype), mask=mask)
    else:
        tl.store(out + offs, z, mask=mask)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``value`` as a one-element tensor of ``dtype`` on ``device``, cached: a training loop
    passes the same eps, scale and sigma every step, and each fresh CUDA tensor is a host copy."""
    return torch.full((1,), value, dtype=dtype, device=device)


def _check_grid(grid, what: str) -> None:
    """CUDA launches at most 65535 programs along y and z; say which size is too large."""
    for axis, extent, name in ((1, grid[1], what), (2, grid[2], "E (members)")):
        if extent > _GRID_YZ:
            raise ValueError(f"mahalanobis (triton): {name} needs {extent} programs along grid axis {axis}, "
                             f"more than CUDA's {_GRID_YZ}; use the cuda, cpu or reference backend")


def _launch(kernel, grid, device, *args, **meta):
    if device.type == "cuda":
        with torch.cuda.device(device):  # Triton launches on the current device's stream
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _close_pairs(ut, v, pts, sq):
    """``(b, e, c, y)`` of the pairs with ``sq < CLOSE (||u||^2 + ||v||^2)`` and their exact
    ``y = F_e (x_b - c)`` (None if there are none): u and v are rounded separately, so their
    difference is inaccurate for pairs that close in (csrc/mahalanobis.h, ``kClose``)."""
    x, c, F, diag = pts
    nu, nv = ut.square().sum(1), v.square().sum(2)
    idx = torch.nonzero(sq < (nu.t()[:, :, None] + nv[None]) * CLOSE)
    if idx.shape[0] == 0:
        return None
    b, e, cc = idx.unbind(1)
    z = (x[b] if x.dim() == 2 else x[b, e]) - c[e, cc]
    if diag:
        return b, e, cc, z * F[e]
    y = torch.empty_like(z)
    chunk = max(1, 2**24 // max(1, F.shape[-1] ** 2))  # gathered factors: at most 2^24 values
    for k in range(0, idx.shape[0], chunk):
        torch.bmm(F[e[k:k + chunk]], z[k:k + chunk, :, None], out=y[k:k + chunk, :, None])
    return b, e, cc, y


def _distances(ut, v, pts, eps):
    """``[B, E, C]`` distances: the kernel for every pair, then the close pairs from the difference."""
    E, N, B = ut.shape
    C = v.shape[1]
    d = torch.empty((B, E, C), dtype=ut.dtype, device=ut.device)
    if d.numel() == 0:
        return d
    grid = (triton.cdiv(B, _BB), triton.cdiv(C, _BC), E)
    _check_grid(grid, f"C = {C} (classes)")
    _launch(_distances_kernel, grid, ut.device, ut, v, d, B, C, N, E, _scalar(float(eps), ut.dtype, ut.device),
            BB=_BB, BC=_BC, BN=_BN, F64=ut.dtype == torch.float64)
    close = _close_pairs(ut, v, pts, d * d - eps)
    if close is not None:
        b, e, c, y = close
        d[b, e, c] = (y.square().sum(1) + eps).sqrt()
    return d


def _distances_backward(ut, v, pts, grad, d, scale, need_ut, need_v):
    """``(dut, dv)`` (None where not needed): one kernel launch for the far pairs, then the
    close pairs' terms ``w F (x_b - c)`` from the difference."""
    E, N, B = ut.shape
    C = v.shape[1]
    dut = torch.zeros_like(ut) if need_ut else None
    dv = torch.zeros_like(v) if need_v else None
    close = _close_pairs(ut, v, pts, d * d)
    g = grad
    if close is not None:
        b, e, c, y = close
        g = grad.clone()
        g[b, e, c] = 0
    tiles_b = triton.cdiv(B, _BB) if need_ut else 0
    tiles_c = triton.cdiv(C, _BC) if need_v else 0
    if tiles_b + tiles_c and N and B and C:
        grid = (tiles_b + tiles_c, triton.cdiv(N, _BN), E)
        _check_grid(grid, f"N = {N} (features)")
        _launch(_distances_backward_kernel, grid, ut.device, ut, v, g, d,
                dut if need_ut else ut, dv if need_v else v, B, C, N, E,
                _scalar(float(scale), ut.dtype, ut.device), tiles_b,
                BB=_BB, BC=_BC, BN=_BN, F64=ut.dtype == torch.float64)
    if close is not None:
        dd = d[b, e, c]
        w = torch.where(dd == 0, torch.zeros_like(dd), grad[b, e, c] * scale / dd)
        r = y * w[:, None]
        if need_ut:
            dut.index_put_((e[:, None], torch.arange(N, device=ut.device)[None, :], b[:, None]), r, accumulate=True)
        if need_v:
            dv.index_put_((e, c), -r, accumulate=True)
    return dut, dv


def _noise_into(out, F, seed, base, sigma):
    M = out.numel()
    if M:
        _launch(_noise_kernel, (triton.cdiv(M, _NOISE_BLOCK),), out.device, F if F is not None else out, out,
                int(seed), int(base), M, _scalar(float(sigma), out.dtype, out.device), PERTURB=F is not None,
                BLOCK=_NOISE_BLOCK, enable_fp_fusion=False)
    return out


def noise(like: torch.Tensor, seed: int, shape) -> torch.Tensor:
    """The float32 draws of ``seed`` (the same values as every other backend)."""
    return _noise_into(torch.empty(tuple(shape), dtype=torch.float32, device=like.device), None, seed, 0, 0.0)


def _acc(*ts):
    dt = acc_dtype(ts[0].dtype)
    return [t.to(dt).contiguous() for t in ts]


def _transform_dense(x, F, c):
    ut = torch.matmul(F, x.t()) if x.dim() == 2 else torch.bmm(F, x.permute(1, 2, 0))
    return ut.contiguous(), torch.bmm(c, F.transpose(1, 2)).contiguous()


def _dense_grads(x, F, c, dut, dv, needs, acc):
    """``acc`` += (dx, dF, dc) from (dut, dv) by GEMMs."""
    E, N, B = F.shape[0], F.shape[1], x.shape[0]
    parts = [None, None, None]
    if needs[0]:
        parts[0] = (dut.reshape(E * N, B).t() @ F.reshape(E * N, N) if x.dim() == 2
                    else torch.bmm(dut.transpose(1, 2), F).transpose(0, 1))
    if needs[1]:
        dF = torch.matmul(dut, x) if x.dim() == 2 else torch.bmm(dut, x.transpose(0, 1))
        parts[1] = torch.baddbmm(dF, dv.transpose(1, 2), c)
    if needs[2]:
        parts[2] = torch.bmm(dv, F)
    for i, p in enumerate(parts):
        if p is not None:
            acc[i] = p if acc[i] is None else acc[i] + p


def _factor_grad(dF, form):
    if form == DIAG:
        return dF.diagonal(0, -2, -1)
    return dF.tril() if form == TRIL else dF


def _finish(grads, inputs, needs):
    return tuple(g.to(t.dtype).contiguous() if n else t.new_empty(0) for g, t, n in zip(grads, inputs, needs))


def _points(x, P, centers, form):
    """(x, centers, factor, diag): the factor dense, or P itself for the diag form."""
    return (x, centers, P, True) if form == DIAG else (x, centers, dense_factor(P, form).contiguous(), False)


def forward(x, P, centers, form: int, eps: float):
    """``(d [B, E, C], ut [E, N, B], v [E, C, N])`` in the accumulation dtype."""
    x, P, centers = _acc(x, P, centers)
    ut, v = transformed(x, P, centers, form)
    return _distances(ut, v, _points(x, P, centers, form), eps), ut, v


def backward(grad, x, P, centers, d, ut, v, form: int, eps: float, needs):
    inputs = (x, P, centers)
    x, P, centers = _acc(x, P, centers)
    t = x.dtype
    pts = _points(x, P, centers, form)
    dut, dv = _distances_backward(ut.to(t).contiguous(), v.to(t).contiguous(), pts, grad.to(t).contiguous(),
                                  d.to(t).contiguous(), 1.0, needs[0] or needs[1], needs[1] or needs[2])
    grads = [None, None, None]
    if form == DIAG:
        p = P[:, :, None]
        if needs[0]:
            grads[0] = (dut * p).sum(0).t() if x.dim() == 2 else (dut * p).permute(2, 0, 1)
        if needs[1]:
            cols = x.t()[None] if x.dim() == 2 else x.permute(1, 2, 0)
            grads[1] = (dut * cols).sum(-1) + (dv * centers).sum(1)
        if needs[2]:
            grads[2] = dv * P[:, None, :]
    else:
        _dense_grads(x, pts[2], centers, dut, dv, needs, grads)
        if needs[1]:
            grads[1] = _factor_grad(grads[1], form)
    return _finish(grads, inputs, needs)


def _samples(x, P, centers, noise_t, seed, samples, sigma, form):
    """Yields each sample's perturbed factor ``F + sigma Z_t``, made when it is needed."""
    F = dense_factor(P, form).contiguous()
    Ft = torch.empty_like(F)
    M = F.numel()
    for t in range(samples):
        if noise_t is not None:
            torch.add(F, noise_t[t].to(F.dtype), alpha=sigma, out=Ft)
        else:
            _noise_into(Ft, F, seed, t * M, sigma)
        yield Ft


def rforward(x, P, centers, noise_t, seed: int, samples: int, sigma: float, form: int, eps: float):
    x, P, centers = _acc(x, P, centers)
    d = torch.zeros((x.shape[0], centers.shape[0], centers.shape[1]), dtype=x.dtype, device=x.device)
    for Ft in _samples(x, P, centers, noise_t, seed, samples, sigma, form):
        ut, v = _transform_dense(x, Ft, centers)
        d += _distances(ut, v, (x, centers, Ft, False), eps) / samples
    return d


def rbackward(grad, x, P, centers, noise_t, seed: int, samples: int, sigma: float, form: int, eps: float, needs):
    inputs = (x, P, centers)
    x, P, centers = _acc(x, P, centers)
    g = grad.to(x.dtype).contiguous()
    grads = [None, None, None]
    for Ft in _samples(x, P, centers, noise_t, seed, samples, sigma, form):
        ut, v = _transform_dense(x, Ft, centers)
        pts = (x, centers, Ft, False)
        dt = _distances(ut, v, pts, eps)
        dut, dv = _distances_backward(ut, v, pts, g, dt, 1.0 / samples, needs[0] or needs[1], needs[1] or needs[2])
        _dense_grads(x, Ft, centers, dut, dv, needs, grads)
    if needs[1]:
        grads[1] = _factor_grad(grads[1], form)
    return _finish(grads, inputs, needs)
