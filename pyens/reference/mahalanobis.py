"""Plain-PyTorch reference of the Mahalanobis distance map (DML paper, eq. 1-2 and 4-5).

Ground truth for tests and the eager baseline for benchmarks:

    d[b, e, c] = sqrt(||F_e (x_b - centers[e, c])||^2 + eps),    M_e = F_e^T F_e

with the factor ``F_e`` built from ``P`` by :func:`dense_factor` (``form``: ``diag`` ->
``diag(P_e)``, ``tril`` -> ``tril(P_e)``, ``full`` -> ``P_e``).  The randomized DML averages
the same distance over ``T`` perturbed factors ``F_e + sigma * Z[t, e]`` (eq. 5).

This file also holds

* the noise generator every backend reproduces bit for bit (:func:`normal_noise`):
  Philox4x32-10 (Salmon et al. 2011, the generator of ``tl.randint4x``) keyed by the seed,
  counter = flat index into ``[T, E, N, N]`` divided by 4, and a Box-Muller transform
  written with correctly rounded float32 ``+ - * / sqrt`` only (polynomial log and
  sin/cos, no fused multiply-add), so C++, CUDA, Triton and this file produce identical
  float32 values;
* the *reference backend* of :mod:`pyens.ops.mahalanobis` (:func:`forward`, :func:`backward`,
  :func:`rforward`, :func:`rbackward`, :func:`noise`): the plain formula, which materialises
  the ``[B, E, C, N]`` difference tensor, differentiated by autograd.  The fast backends use
  a different algorithm (transform by ``F``, then distances between transformed points), so
  comparing the two is a real check.
"""
from __future__ import annotations

import torch

from pyens.ops.contract import DIAG, FORM_NAMES, FORMS, FULL, TRIL, acc_dtype  # noqa: F401  (the op's forms)


def dense_factor(P: torch.Tensor, form: int) -> torch.Tensor:
    """The factor ``F`` ``[E, N, N]`` with ``M_e = F_e^T F_e``; the upper part of a tril factor is never read."""
    if form == DIAG:
        return torch.diag_embed(P)
    if form == TRIL:
        return torch.tril(P)
    return P


def _diff(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``x_b - centers[e, c]`` as ``[B, E, C, N]`` (x shared ``[B, N]`` or per member ``[B, E, N]``)."""
    xb = x[:, None, None, :] if x.dim() == 2 else x[:, :, None, :]
    return xb - centers[None]


def _sqrt(q: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 at q = 0 (only reachable with eps = 0, at x = c); NaN propagates."""
    zero = q == 0
    return torch.where(zero, torch.zeros_like(q), torch.sqrt(torch.where(zero, torch.ones_like(q), q)))


def mahalanobis(x: torch.Tensor, P: torch.Tensor, centers: torch.Tensor, *, form: int = TRIL,
                eps: float = 1e-12) -> torch.Tensor:
    """The plain formula (broadcast difference, einsum, sqrt): ``[B, E, C]``, differentiable."""
    z = _diff(x, centers)
    if form == DIAG:
        y = z * P[None, :, None, :]
    else:
        y = torch.einsum("eij,becj->beci", dense_factor(P, form), z)
    return _sqrt((y * y).sum(-1) + eps)


def randomized_mahalanobis(x: torch.Tensor, P: torch.Tensor, centers: torch.Tensor, noise: torch.Tensor, *,
                           sigma: float, form: int = TRIL, eps: float = 1e-12) -> torch.Tensor:
    """``mean_t sqrt(||(F_e + sigma Z[t, e]) (x_b - c)||^2 + eps)`` for ``noise`` Z ``[T, E, N, N]``."""
    z = _diff(x, centers)
    F = dense_factor(P, form)
    total = None
    for t in range(noise.shape[0]):
        y = torch.einsum("eij,becj->beci", F + sigma * noise[t].to(F.dtype), z)
        d = _sqrt((y * y).sum(-1) + eps)
        total = d if total is None else total + d
    return total / noise.shape[0]


# ---------------------------------------------------------------------------------------------
# the noise: Philox4x32-10 + exactly rounded Box-Muller (shared bit for bit by every backend)

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
# float32 constants, given exactly (hex) so that every implementation uses the same values.
_F32 = {name: float.fromhex(h) for name, h in {
    "SQRT2": "0x1.6a09e6p+0", "LN2": "0x1.62e430p-1", "HALF_PI": "0x1.921fb6p+0",
    # log(m) = 2 s (1 + s^2/3 + s^4/5 + ... + s^12/13), s = (m - 1) / (m + 1), |s| < 0.172
    "L1": "0x1.555556p-2", "L2": "0x1.99999ap-3", "L3": "0x1.24924ap-3", "L4": "0x1.c71c72p-4",
    "L5": "0x1.745d18p-4", "L6": "0x1.3b13b2p-4",
    # sin(a) = a + a^3 (S1 + a^2 (S2 + a^2 (S3 + a^2 S4))), 0 <= a <= pi/4
    "S1": "-0x1.555556p-3", "S2": "0x1.111112p-7", "S3": "-0x1.a01a02p-13", "S4": "0x1.71de3ap-19",
    # cos(a) = 1 + a^2 (C1 + a^2 (C2 + a^2 (C3 + a^2 (C4 + a^2 C5))))
    "C1": "-0x1.000000p-1", "C2": "0x1.555556p-5", "C3": "-0x1.6c16c2p-10", "C4": "0x1.a01a02p-16",
    "C5": "-0x1.27e4fcp-22",
}.items()}
NOISE_CONSTANTS = dict(_F32)  # read by tests that check the other implementations use the same


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and int64 ``b`` in ``[0, 2^32)``."""
    p0 = a * (b & 0xFFFF)          # < 2^48: exact in int64
    mid = a * (b >> 16) + (p0 >> 16)  # < 2^49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p0 & 0xFFFF)


def philox4x32(counter: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters ``(counter mod 2^32, counter >> 32, 0, 0)`` and key ``(seed mod 2^32, seed >> 32)``.

    The same stream as Triton's ``tl.randint4x(seed, counter)``; returns four int64 tensors
    holding uint32 values.
    """
    c0, c1 = counter & _MASK32, counter >> 32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _box_muller(r0: torch.Tensor, r1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two standard normals from two uint32 draws, in float32 with one rounding per operation."""
    def f(name):
        return torch.tensor(_F32[name], dtype=torch.float32)

    one, half = torch.tensor(1.0), torch.tensor(0.5)
    # uniforms (k + 1/2) 2^-23 in (0, 1), exact
    u1 = ((r0 >> 9).to(torch.float32) + half) * 2.0**-23
    u2 = ((r1 >> 9).to(torch.float32) + half) * 2.0**-23
    # log(u1) = e ln2 + log(m), m in (sqrt(2)/2, sqrt(2)]
    bits = u1.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > f("SQRT2")
    m = torch.where(big, m * half, m)
    e = torch.where(big, e + 1, e)
    s = (m - one) / (m + one)
    s2 = s * s
    p = f("L6")
    for name in ("L5", "L4", "L3", "L2", "L1"):
        p = f(name) + s2 * p
    p = one + s2 * p
    logu = e.to(torch.float32) * f("LN2") + (s + s) * p
    # torch's float32 sqrt on the CPU is not correctly rounded; the float64 one, rounded to
    # float32, is (53 >= 2 * 24 + 2 bits), so it matches IEEE sqrt everywhere else.
    r = torch.sqrt((logu * -2.0).double()).float()
    # angle 2 pi u2 = (pi/2)(q + frac): sin/cos of a in [0, pi/4], then symmetries
    v = u2 * 4.0
    q = torch.floor(v)
    frac = v - q
    swap = frac >= half
    a = torch.where(swap, one - frac, frac) * f("HALF_PI")
    a2 = a * a
    ps = f("S4")
    for name in ("S3", "S2", "S1"):
        ps = f(name) + a2 * ps
    sn = a + (a * a2) * ps
    pc = f("C5")
    for name in ("C4", "C3", "C2", "C1"):
        pc = f(name) + a2 * pc
    cs = one + a2 * pc
    sn, cs = torch.where(swap, cs, sn), torch.where(swap, sn, cs)
    qi = q.to(torch.int64)
    sin_t = torch.where(qi == 0, sn, torch.where(qi == 1, cs, torch.where(qi == 2, -sn, -cs)))
    cos_t = torch.where(qi == 0, cs, torch.where(qi == 1, -sn, torch.where(qi == 2, -cs, sn)))
    return r * cos_t, r * sin_t


def normal_noise(seed: int, shape, device=None) -> torch.Tensor:
    """Standard normal float32 noise of ``shape``: element ``i`` (flat) is lane ``i % 4`` of the
    four Box-Muller values of Philox counter ``i // 4``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    idx = torch.arange(numel, dtype=torch.int64)
    r = philox4x32(idx >> 2, int(seed))
    z0, z1 = _box_muller(r[0], r[1])
    z2, z3 = _box_muller(r[2], r[3])
    lane = idx & 3
    z = torch.where(lane == 0, z0, torch.where(lane == 1, z1, torch.where(lane == 2, z2, z3)))
    return z.reshape(tuple(shape)).to(device)


# ---------------------------------------------------------------------------------------------
# the reference backend of pyens.ops.mahalanobis (same contract as the compiled and Triton ones)

def _acc(*ts):
    dt = acc_dtype(ts[0].dtype)
    return [t.to(dt) for t in ts]


def transformed(x, P, centers, form):
    """``ut = F x`` as ``[E, N, B]`` and ``v = F c`` as ``[E, C, N]``: the op's saved state."""
    if form == DIAG:
        cols = x.t()[None] if x.dim() == 2 else x.permute(1, 2, 0)
        return (P[:, :, None] * cols).contiguous(), (centers * P[:, None, :]).contiguous()
    F = dense_factor(P, form)
    ut = torch.einsum("eij,bj->eib", F, x) if x.dim() == 2 else torch.einsum("eij,bej->eib", F, x)
    return ut.contiguous(), torch.einsum("eij,ecj->eci", F, centers).contiguous()


def forward(x, P, centers, form: int, eps: float):
    """``(d [B, E, C], ut [E, N, B], v [E, C, N])`` in the accumulation dtype."""
    x, P, centers = _acc(x, P, centers)
    u, v = transformed(x, P, centers, form)
    return mahalanobis(x, P, centers, form=form, eps=eps), u, v


def _grads(fn, grad, inputs, needs):
    """The vector-Jacobian product of ``fn(*inputs)`` with ``grad`` for the inputs flagged in
    ``needs`` (empty tensors for the others)."""
    acc = _acc(*inputs)
    wanted = [i for i, n in enumerate(needs) if n]

    # The product as the gradient of the scalar sum(out * grad): the same values, and no tensor
    # of gradient outputs, for which torch imports sympy (~1 s) on the first autograd.grad.
    def weighted_sum(*w):
        args = list(acc)
        for i, t in zip(wanted, w):
            args[i] = t
        out = fn(*args)
        return (out * grad.to(out.dtype)).sum()

    got = ()
    if wanted:
        with torch.enable_grad():
            leaves = [acc[i].detach().requires_grad_() for i in wanted]
            total = weighted_sum(*leaves)
            if total.requires_grad:
                got = torch.autograd.grad(total, leaves)
            else:  # inside the registered backward op, whose dispatch has autograd switched off:
                # torch.func's transform works below it (its first call costs ~1 s, once)
                got = torch.func.grad(weighted_sum, argnums=tuple(range(len(wanted))))(*leaves)
    got = iter(got)
    return tuple(next(got).to(t.dtype) if n else t.new_empty(0) for t, n in zip(inputs, needs))


def backward(grad, x, P, centers, d, u, v, form: int, eps: float, needs):
    """``(dx, dP, dcenters)``; an input whose flag in ``needs`` is false gets an empty tensor."""
    return _grads(lambda a, b, c: mahalanobis(a, b, c, form=form, eps=eps), grad, (x, P, centers), needs)


def _noise_for(noise, seed, samples, E, N, device):
    return noise if noise is not None else normal_noise(seed, (samples, E, N, N), device)


def rforward(x, P, centers, noise, seed: int, samples: int, sigma: float, form: int, eps: float):
    """Randomized DML ``[B, E, C]`` (accumulation dtype) over ``noise`` or the seed's draws."""
    x, P, centers = _acc(x, P, centers)
    z = _noise_for(noise, seed, samples, centers.shape[0], centers.shape[2], x.device)
    return randomized_mahalanobis(x, P, centers, z, sigma=sigma, form=form, eps=eps)


def rbackward(grad, x, P, centers, noise, seed: int, samples: int, sigma: float, form: int, eps: float, needs):
    z = _noise_for(noise, seed, samples, centers.shape[0], centers.shape[2], x.device)
    return _grads(lambda a, b, c: randomized_mahalanobis(a, b, c, z, sigma=sigma, form=form, eps=eps),
                  grad, (x, P, centers), needs)


def noise(like: torch.Tensor, seed: int, shape) -> torch.Tensor:
    return normal_noise(seed, shape, like.device)
