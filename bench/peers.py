"""Eager-PyTorch peers of the lp step: the way attack libraries write it today.

These are the baselines ``bench_lp_step.py`` times the pyens backends against.  Each
follows the structure of a widely used public implementation (written from the
algorithms, not copied), including its cost: several full-size temporaries per step
for linf/l2 (torchattacks' PGD and PGDL2), whole-row sorts plus host round trips
for l1 (AutoAttack's APGD-l1 step and its ``L1_projection``).

Shapes: ``delta``, ``grad``, ``x`` are ``[B, ...]`` (one sample per leading index);
norms are taken over everything but the first dimension.  All values are pixel units,
the box is ``[0, 1]``.  Every function returns the new perturbation ``delta``.

Conventions, compared with :func:`pyens.reference.lp_step.lp_rows`:

* :func:`linf_step` equals the reference linf step (exact projection, which for linf
  is also the sequential one) up to the rounding of ``(x + d) - x``.
* :func:`l2_step` is the *sequential* convention (ball, then box clamp) with the
  ``+ 1e-10`` gradient-norm floor of torchattacks; the reference floors at ``1e-12``.
* :func:`l1_step` is the *exact* ball ∩ box projection (Croce & Hein 2021) after the
  sparse top-k direction, as AutoAttack's APGD-l1 computes them.

Run ``python -m bench.peers`` to check all three against the reference.
"""
from __future__ import annotations

import time

import torch

__all__ = [
    "linf_step",
    "l2_step",
    "l1_direction",
    "l1_projection",
    "l1_step",
    "peer_step",
    "copy_probe",
    "copy_bandwidth",
]


def _bview(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values ``[B]`` shaped to broadcast against ``like`` ``[B, ...]``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------- linf
def linf_step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, *, eps: float,
              alpha: float) -> torch.Tensor:
    """torchattacks-style PGD (linf) step: sign ascent, clamp to the ball, clamp to the box."""
    adv = x + delta + alpha * grad.sign()
    d = torch.clamp(adv - x, min=-eps, max=eps)
    adv = torch.clamp(x + d, min=0, max=1)
    return adv - x


# ----------------------------------------------------------------------------- l2
def l2_step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, *, eps: float,
            alpha: float) -> torch.Tensor:
    """torchattacks-style PGDL2 step: normalised gradient, rescale into the ball, clamp to the box."""
    b = x.shape[0]
    gnorm = torch.norm(grad.reshape(b, -1), p=2, dim=1) + 1e-10
    g = grad / _bview(gnorm, grad)
    adv = x + delta + alpha * g
    d = adv - x
    dnorm = torch.norm(d.reshape(b, -1), p=2, dim=1)
    factor = torch.min(eps / dnorm, torch.ones_like(dnorm))
    d = d * _bview(factor, d)
    adv = torch.clamp(x + d, min=0, max=1)
    return adv - x


# ----------------------------------------------------------------------------- l1
def l1_direction(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, *, k: int = 20) -> torch.Tensor:
    """Sparse l1 ascent direction by sorting, as AutoAttack's APGD-l1 builds it.

    Sorts ``|g|`` of each row (coordinates that cannot move, i.e. at the top of the box
    with ``g > 0``, at the bottom with ``g < 0``, or with ``g == 0``, sort last), keeps
    the ``k`` largest through a threshold, and returns ``sign(g) / count`` on them.
    """
    b = x.shape[0]
    g = grad.reshape(b, -1)
    p = (x + delta).reshape(b, -1)
    movable = (g != 0) & ~((p >= 1) & (g > 0)) & ~((p <= 0) & (g < 0))
    score = torch.where(movable, g.abs(), torch.full_like(g, -1.0))
    srt = torch.sort(score, dim=1, descending=True).values
    kk = min(k, g.shape[1])
    thr = srt[:, kk - 1:kk]
    keep = movable & (score >= thr)
    sgn = torch.sign(g) * keep
    count = keep.sum(dim=1, keepdim=True).clamp(min=1)
    return (sgn / count).view_as(grad)


def l1_projection(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Exact projection of the perturbation ``y`` onto ``{||z||_1 <= eps} ∩ {0 <= x + z <= 1}``.

    The sort-based algorithm of Croce & Hein, "Mind the box" (ICML 2021), organised the
    way AutoAttack's ``L1_projection`` is: the solution is
    ``z_i = sign(y_i) * min(max(|y_i| - lam, 0), r_i)`` with ``r_i`` the room towards
    ``sign(y_i)``.  The l1 mass ``m(lam)`` is piecewise linear with breakpoints at
    ``max(|y_i| - r_i, 0)`` (coordinate leaves its bound, slope -1) and ``|y_i|``
    (coordinate reaches 0, slope +1).  Rows already feasible after the box clamp are
    picked out on the host (``nonzero``); for the others all ``2n`` breakpoints are
    sorted, the mass at each is a cumulative sum, and ``searchsorted`` finds the
    segment holding ``m(lam) = eps``.
    """
    b = x.shape[0]
    xf = x.reshape(b, -1)
    yf = y.reshape(b, -1)
    u = yf.abs()
    room = torch.where(yf >= 0, (1 - xf).clamp(min=0), xf.clamp(min=0))
    c = torch.minimum(u, room)                      # box-clamped magnitudes
    out = torch.sign(yf) * c
    outside = (c.sum(dim=1) > eps).nonzero().squeeze(1)   # host sync, as AutoAttack does
    if outside.numel() == 0:
        return out.view_as(y)
    uo, ro, co = u[outside], room[outside], c[outside]
    n = uo.shape[1]
    start = (uo - ro).clamp(min=0)                 # slope of m decreases by 1 here
    bps, order = torch.sort(torch.cat((start, uo), dim=1), dim=1)
    step = torch.where(order < n, 1.0, -1.0).to(uo.dtype)
    active = step.cumsum(dim=1)                     # count of linear coordinates after bp j
    gaps = torch.diff(bps, dim=1)
    m0 = co.sum(dim=1, keepdim=True)
    drop = (active[:, :-1] * gaps).cumsum(dim=1)
    mass = torch.cat((m0, m0 - drop), dim=1)        # m(bp_j), non-increasing
    eps_t = torch.full((outside.numel(), 1), float(eps), dtype=uo.dtype, device=uo.device)
    j = torch.searchsorted(-mass.contiguous(), -eps_t, right=False).clamp(1, 2 * n - 1)
    lam = bps.gather(1, j - 1) + (mass.gather(1, j - 1) - eps_t) / active.gather(1, j - 1).clamp(min=1)
    zo = torch.minimum((uo - lam).clamp(min=0), ro)
    out[outside] = torch.sign(yf[outside]) * zo
    return out.view_as(y)


def l1_step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, *, eps: float, alpha: float,
            k: int = 20) -> torch.Tensor:
    """AutoAttack-style l1 step: sorted sparse direction, then the sorted exact projection."""
    y = delta + alpha * l1_direction(grad, x, delta, k=k)
    return l1_projection(x, y, eps)


_PEERS = {"linf": linf_step, "l2": l2_step, "l1": l1_step}


def peer_step(delta, grad, x, *, norm: str, eps: float, alpha: float, k: int = 20) -> torch.Tensor:
    """The field's step for one norm (``"linf" | "l2" | "l1"``) on ``[B, ...]`` inputs."""
    if norm == "l1":
        return l1_step(delta, grad, x, eps=eps, alpha=alpha, k=k)
    return _PEERS[norm](delta, grad, x, eps=eps, alpha=alpha)


# ----------------------------------------------------------------------------- bandwidth
def copy_probe(step_bytes: int, device="cpu"):
    """``dst.copy_(src)`` moving ``step_bytes`` (read + write) on float32 tensors.

    Each tensor holds ``step_bytes / 8`` floats, so one copy reads and writes as many bytes
    as one lp step moves.  Returns ``(fn, bytes_moved)``; ``fn`` synchronises on CUDA.
    """
    numel = max(1, step_bytes // 8)
    src = torch.rand(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    cuda = torch.device(device).type == "cuda"

    def fn():
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize()

    return fn, 8 * numel


def copy_bandwidth(step_bytes: int, device="cpu", rounds: int = 50, warmup: int = 5) -> float:
    """Median copy bandwidth in GB/s (read + write counted) at the given step size."""
    fn, moved = copy_probe(step_bytes, device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return moved / times[len(times) // 2] / 1e9


# ----------------------------------------------------------------------------- self-check
def _inputs(b, n, eps, norm, dtype, gen, zero_grad_rows=0):
    x = torch.rand(b, n, dtype=dtype, generator=gen)
    x[:, : n // 10] = torch.randint(0, 2, (b, n // 10), generator=gen).to(dtype)  # pixels at the box
    v = torch.randn(b, n, dtype=dtype, generator=gen)
    if norm == "linf":
        d = eps * (2 * torch.rand(b, n, dtype=dtype, generator=gen) - 1)
    else:
        p = 2 if norm == "l2" else 1
        r = torch.rand(b, 1, dtype=dtype, generator=gen) * 1.2 * eps   # some rows inside, some outside
        d = v / v.norm(p=p, dim=1, keepdim=True) * r
    d = torch.clamp(x + d, 0, 1) - x
    g = torch.randn(b, n, dtype=dtype, generator=gen)
    g[:zero_grad_rows] = 0
    return d, g, x


def check_against_reference(seed: int = 0, verbose: bool = True) -> None:
    """Compare the peers with :func:`pyens.reference.lp_step.lp_rows` on random float64 rows."""
    from pyens.reference.lp_step import L1, L2, LINF, PROJECT, STEP, lp_rows

    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    worst = {}
    for b, n in [(7, 1), (16, 5), (64, 784), (32, 3072)]:
        for eps, alpha, eps1, alpha1, eps2, alpha2 in [(0.3, 0.01, 10.0, 0.8, 2.0, 0.1),
                                                       (0.03, 0.003, 12.0, 1.0, 0.5, 0.02),
                                                       (0.0, 0.1, 0.0, 1.0, 0.0, 0.1)]:
            # linf: exact (= sequential) projection, up to the rounding of (x + d) - x.
            d, g, x = _inputs(b, n, eps, "linf", f64, gen)
            ref, _ = lp_rows(STEP, d, g, x, [LINF], [eps], [alpha], [20], 0.0, 1.0, True)
            err = (linf_step(d, g, x, eps=eps, alpha=alpha) - ref).abs().max().item()
            assert err <= 4 * torch.finfo(f64).eps, ("linf", b, n, err)
            worst["linf step"] = max(worst.get("linf step", 0.0), err)

            # l2: the sequential convention; the gradient floor differs (1e-10 vs 1e-12).
            # (eps = 0 with a zero step gives torchattacks' 0/0: the peer's defect, not checked.)
            eps2 = eps2 or 1e-3
            d, g, x = _inputs(b, n, eps2, "l2", f64, gen, zero_grad_rows=1)
            ref, _ = lp_rows(STEP, d, g, x, [L2], [eps2], [alpha2], [20], 0.0, 1.0, False)
            got = l2_step(d, g, x, eps=eps2, alpha=alpha2)
            gn = g.norm(dim=1, keepdim=True).clamp(min=1e-12)
            tol = alpha2 * 1e-10 / gn + 1e-14          # what the floor difference can move
            err = ((got - ref).abs() - tol).max().item()
            assert err <= 0, ("l2", b, n, err)
            worst["l2 step"] = max(worst.get("l2 step", 0.0), (got - ref).abs().max().item())

            # l1: the projection alone (exact, ball ∩ box), then the full step.
            d, g, x = _inputs(b, n, eps1, "l1", f64, gen)
            y = d + 3 * alpha1 * torch.randn(b, n, dtype=f64, generator=gen) / max(1, n) ** 0.5
            ref, _ = lp_rows(PROJECT, y, g, x, [L1], [eps1], [alpha1], [20], 0.0, 1.0, True)
            err = (l1_projection(x, y, eps1) - ref).abs().max().item()
            assert err <= 1e-6, ("l1 projection", b, n, err)
            worst["l1 projection"] = max(worst.get("l1 projection", 0.0), err)
            for k in (1, 20, 10**6):
                ref, _ = lp_rows(STEP, d, g, x, [L1], [eps1], [alpha1], [k], 0.0, 1.0, True)
                err = (l1_step(d, g, x, eps=eps1, alpha=alpha1, k=k) - ref).abs().max().item()
                assert err <= 1e-6, ("l1 step", b, n, k, err)
                worst["l1 step"] = max(worst.get("l1 step", 0.0), err)
    # Image-shaped inputs ([B, C, H, W]) go through the same code.
    d, g, x = _inputs(4, 3 * 8 * 8, 12.0, "l1", f64, gen)
    shape = (4, 3, 8, 8)
    ref, _ = lp_rows(STEP, d, g, x, [L1], [12.0], [1.0], [20], 0.0, 1.0, True)
    got = l1_step(d.view(shape), g.view(shape), x.view(shape), eps=12.0, alpha=1.0).reshape(4, -1)
    assert (got - ref).abs().max().item() <= 1e-6
    if verbose:
        for name, err in worst.items():
            print(f"{name:15s} max |peer - reference| = {err:.3e}")


if __name__ == "__main__":
    check_against_reference()
    print("peers agree with pyens.reference.lp_step")
