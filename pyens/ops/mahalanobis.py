"""The distance map layer (DML) of the DML-ensemble paper: ``mahalanobis`` and ``randomized_mahalanobis``.

    d[b, e, c] = sqrt(||F_e (x_b - centers[e, c])||^2 + eps),   M_e = F_e^T F_e      (eq. 1-2)
    g[b, e, c] = mean_t sqrt(||(F_e + sigma Z[t, e]) (x_b - centers[e, c])||^2 + eps)  (eq. 4-5)

with the factor ``F_e`` = ``diag(P_e)``, ``tril(P_e)`` or ``P_e`` (``form``); logits are ``-d``.

Each public function checks its arguments (errors name the argument) and calls a
``torch.library`` custom op (``pyens::mahalanobis``, ``pyens::randomized_mahalanobis``) with
a fake kernel (``torch.compile(fullgraph=True)``) and an autograd formula registered with
``register_autograd``: the backward is ONE call of the backend's backward kernel, which
computes only the gradients ``ctx.needs_input_grad`` asks for.  The op's implementation picks
a backend (:mod:`pyens.ops.dispatch`): ``cpu`` / ``cuda`` (``pyens._C``), ``triton``
(``pyens.kernels.mahalanobis``) or ``reference`` (``pyens.reference.mahalanobis``); they share
this schema and these checks and differ only in the kernels.

The forward also returns the transformed points ``ut = F x`` ``[E, N, B]`` and ``v = F c``
``[E, C, N]`` (accumulation dtype); they are the saved state of the backward, which then needs
no second transform.  The randomized op saves nothing per sample: its backward regenerates
the draws from the seed (or reads the explicit ``noise``), so memory does not grow with T.

Each op is one :class:`~pyens.ops.dispatch.RegisteredOp`: the autograd formula above is its
only definition. Under ``torch.compile`` calls go through the registered op; in eager mode
they skip the dispatcher (which makes the forward and backward 1.46x slower at the paper's
size: docs/performance.md, "Eager calls and the registered op") and run the same
implementation through an ``autograd.Function`` built from the same ``setup_context`` and
backward.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from pyens.ops.dispatch import Kernel, Op, RegisteredOp, register_op
from pyens.checks import count_arg, real_arg
from pyens.ops.contract import FORM_NAMES, FORMS, acc_dtype

_SEED_LIMIT = 2**63


class _Compiled:
    """The pyens._C kernels (the dispatcher routes CPU tensors to .cpp, CUDA tensors to .cu)."""

    @staticmethod
    def forward(x, P, centers, form, eps):
        return torch.ops.pyens_C.mahalanobis_fwd(x, P, centers, form, eps)

    @staticmethod
    def backward(grad, x, P, centers, d, ut, v, form, eps, needs):
        return torch.ops.pyens_C.mahalanobis_bwd(grad, x, P, centers, d, ut, v, form, eps, needs)

    @staticmethod
    def rforward(x, P, centers, noise, seed, samples, sigma, form, eps):
        return torch.ops.pyens_C.rmahalanobis_fwd(x, P, centers, noise, seed, samples, sigma, form, eps)

    @staticmethod
    def rbackward(grad, x, P, centers, noise, seed, samples, sigma, form, eps, needs):
        return torch.ops.pyens_C.rmahalanobis_bwd(grad, x, P, centers, noise, seed, samples, sigma, form, eps, needs)

    @staticmethod
    def noise(like, seed, shape):
        return torch.ops.pyens_C.mahalanobis_noise(like, seed, list(shape))


def _load_compiled():
    from pyens.ops.dispatch import compiled_extension

    compiled_extension()  # importing pyens._C registers pyens_C::mahalanobis_*
    return _Compiled


def _load_triton():
    from pyens.kernels import mahalanobis

    return mahalanobis


def _load_reference():
    from pyens.reference import mahalanobis

    return mahalanobis


# Each backend's load() returns a namespace with forward/backward/rforward/rbackward/noise.
OP = register_op(Op("mahalanobis", {
    "cuda": Kernel("cuda", _load_compiled),
    "triton": Kernel("triton", _load_triton),
    "cpu": Kernel("cpu", _load_compiled, dtypes=frozenset({torch.float32, torch.float64})),
    "reference": Kernel("reference", _load_reference),
}))


def _kernels(x: torch.Tensor):
    return OP.select(x.device, x.dtype, x.shape[-1])[1]


# ---------------------------------------------------------------------------------------------
# argument checks

def _form(form, fn: str) -> int:
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"{fn}: form must be 'diag', 'tril' or 'full', got {form!r}")
    return FORMS[form]


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_inputs(fn: str, x, P, centers, form: str) -> None:
    """Types, shapes, dtype and device of ``x``, ``P``, ``centers``; errors name the argument."""
    for name, t in (("x", x), ("P", P), ("centers", centers)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if centers.dim() != 3:
        raise ValueError(f"{fn}: centers must be [E, C, N], got {_shape(centers)}")
    E, C, N = centers.shape
    if not ((x.dim() == 2 and x.shape[1] == N) or (x.dim() == 3 and x.shape[1:] == (E, N))):
        raise ValueError(f"{fn}: x must be [B, N] = [B, {N}] or [B, E, N] = [B, {E}, {N}] "
                         f"(centers are [E, C, N] = {_shape(centers)}), got {_shape(x)}")
    want = (E, N) if form == "diag" else (E, N, N)
    if _shape(P) != want:
        dims = "[E, N]" if form == "diag" else "[E, N, N]"
        raise ValueError(f"{fn}: P must be {dims} = {list(want)} for form={form!r}, got {_shape(P)}")
    for name, t in (("P", P), ("centers", centers)):
        if t.dtype != x.dtype:
            raise TypeError(f"{fn}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} must be on x's device {x.device}, got {t.device}")


def _eps(eps, fn: str) -> float:
    return real_arg(eps, f"{fn}: eps", allow_inf=False)


def _seed(seed, fn: str) -> torch.Tensor:
    """The seed as an int64 0-d CPU tensor; None draws one from torch's default generator."""
    if seed is None:
        return torch.randint(0, _SEED_LIMIT - 1, (), dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"{fn}: seed must be an int in [0, 2**63) or None, got {seed!r}")
    return torch.tensor(int(seed), dtype=torch.int64)


def _noise(noise, samples, x, centers, fn: str) -> tuple[Optional[torch.Tensor], int]:
    if noise is None:
        if samples is None:
            raise ValueError(f"{fn}: samples is required when no noise is given")
        return None, count_arg(samples, f"{fn}: samples")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"{fn}: noise must be a floating-point torch.Tensor, got "
                        f"{getattr(noise, 'dtype', type(noise).__name__)}")
    E, _, N = centers.shape
    if noise.dim() != 4 or noise.shape[1:] != (E, N, N) or noise.shape[0] < 1:
        raise ValueError(f"{fn}: noise must be [T, E, N, N] = [T, {E}, {N}, {N}] with T >= 1, got {_shape(noise)}")
    if noise.device != x.device:
        raise ValueError(f"{fn}: noise must be on x's device {x.device}, got {noise.device}")
    T = noise.shape[0]
    if samples is not None and count_arg(samples, f"{fn}: samples") != T:
        raise ValueError(f"{fn}: samples={samples} but noise holds {T} samples")
    return noise.detach(), T


# ---------------------------------------------------------------------------------------------
# implementations (backend choice), fake kernels and autograd: one definition per op

# The compiled kernels check shapes, dtypes and devices themselves (TORCH_CHECK in
# csrc/mahalanobis.h); for them the Python checks run only when a call fails, to name the
# argument in the error: at the papers' sizes they cost a tenth of the whole op.
_SELF_CHECKING = frozenset({"cpu", "cuda"})


def _forward_impl(x: torch.Tensor, P: torch.Tensor, centers: torch.Tensor, form: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend, kernels = OP.select(x.device, x.dtype, x.shape[-1])
    if backend not in _SELF_CHECKING:
        check_inputs("mahalanobis", x, P, centers, FORM_NAMES.get(form, form))
    return tuple(kernels.forward(x, P, centers, form, eps))


def _backward_impl(grad: torch.Tensor, x: torch.Tensor, P: torch.Tensor, centers: torch.Tensor, d: torch.Tensor,
                   ut: torch.Tensor, v: torch.Tensor, form: int, eps: float,
                   needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_kernels(x).backward(grad, x, P, centers, d, ut, v, form, eps, list(needs)))


def _rforward_impl(x: torch.Tensor, P: torch.Tensor, centers: torch.Tensor, noise: Optional[torch.Tensor],
                   seed: torch.Tensor, samples: int, sigma: float, form: int, eps: float) -> torch.Tensor:
    return _kernels(x).rforward(x, P, centers, noise, int(seed), samples, sigma, form, eps)


def _rbackward_impl(grad: torch.Tensor, x: torch.Tensor, P: torch.Tensor, centers: torch.Tensor,
                    noise: Optional[torch.Tensor], seed: torch.Tensor, samples: int, sigma: float, form: int,
                    eps: float, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_kernels(x).rbackward(grad, x, P, centers, noise, int(seed), samples, sigma, form, eps,
                                       list(needs)))


def _fake_grads(x, P, centers, needs):
    return tuple(t.new_empty(t.shape if n else (0,)) for t, n in zip((x, P, centers), needs))


def _fake_forward(x, P, centers, form, eps):
    acc = acc_dtype(x.dtype)
    (B, E, C, N) = (x.shape[0], *centers.shape)
    return (x.new_empty((B, E, C), dtype=acc), x.new_empty((E, N, B), dtype=acc),
            x.new_empty((E, C, N), dtype=acc))


def _fake_backward(grad, x, P, centers, d, ut, v, form, eps, needs):
    return _fake_grads(x, P, centers, needs)


def _fake_rforward(x, P, centers, noise, seed, samples, sigma, form, eps):
    return x.new_empty((x.shape[0], centers.shape[0], centers.shape[1]), dtype=acc_dtype(x.dtype))


def _fake_rbackward(grad, x, P, centers, noise, seed, samples, sigma, form, eps, needs):
    return _fake_grads(x, P, centers, needs)


def _setup(ctx, inputs, output):
    x, P, centers, form, eps = inputs
    d, ut, v = output
    ctx.mark_non_differentiable(ut, v)
    ctx.save_for_backward(x, P, centers, d, ut, v)
    ctx.form, ctx.eps = form, eps


def _needs(ctx) -> list[bool]:
    """Which of x, P, centers autograd wants a gradient for (the backward kernels' ``needs``)."""
    return [bool(n) for n in ctx.needs_input_grad[:3]]


def _or_none(grads, needs) -> tuple:
    return tuple(g if n else None for g, n in zip(grads, needs))


def _backward(ctx, grad_d, *_unused):  # ut and v are not differentiable
    """DML eq. 2's gradients in one backend call that computes only what ``needs`` asks for."""
    needs = _needs(ctx)
    if not any(needs):
        return None, None, None, None, None
    x, P, centers, d, ut, v = ctx.saved_tensors
    grads = MAHALANOBIS_BACKWARD.within(ctx)(grad_d.contiguous(), x, P, centers, d, ut, v, ctx.form, ctx.eps, needs)
    return (*_or_none(grads, needs), None, None)


def _rsetup(ctx, inputs, output):
    x, P, centers, noise, seed, samples, sigma, form, eps = inputs
    ctx.save_for_backward(x, P, centers, noise, seed)
    ctx.samples, ctx.sigma, ctx.form, ctx.eps = samples, sigma, form, eps


def _rbackward(ctx, grad_d):
    """Eq. 4-5's gradients; the draws are regenerated from the seed (or read from ``noise``)."""
    needs = _needs(ctx)
    if not any(needs):
        return (None,) * 9
    x, P, centers, noise, seed = ctx.saved_tensors
    grads = RANDOMIZED_BACKWARD.within(ctx)(grad_d.contiguous(), x, P, centers, noise, seed, ctx.samples,
                                            ctx.sigma, ctx.form, ctx.eps, needs)
    return _or_none(grads, needs) + (None,) * 6


MAHALANOBIS_BACKWARD = RegisteredOp("mahalanobis_backward", _backward_impl, fake=_fake_backward)
RANDOMIZED_BACKWARD = RegisteredOp("randomized_mahalanobis_backward", _rbackward_impl, fake=_fake_rbackward)
MAHALANOBIS = RegisteredOp("mahalanobis", _forward_impl, fake=_fake_forward, setup_context=_setup,
                           backward=_backward, differentiable=3)
RANDOMIZED = RegisteredOp("randomized_mahalanobis", _rforward_impl, fake=_fake_rforward, setup_context=_rsetup,
                          backward=_rbackward, differentiable=3)


# ---------------------------------------------------------------------------------------------
# public API

def mahalanobis(x: torch.Tensor, P: torch.Tensor, centers: torch.Tensor, *, form: str = "tril",
                eps: float = 1e-12) -> torch.Tensor:
    """Mahalanobis distances of every sample to every member's class centers (DML eq. 2).

    ``d[b, e, c] = sqrt(||F_e (x_b - centers[e, c])||^2 + eps)`` with ``M_e = F_e^T F_e``.

    Args:
        x: features ``[B, N]`` shared by all members, or ``[B, E, N]`` one row per member.
        P: the factor of ``M``: ``[E, N, N]`` for ``form="tril"`` (lower triangle used, the
            upper part ignored) and ``"full"``; ``[E, N]`` for ``"diag"`` (``M_e = diag(P_e^2)``).
        centers: ``[E, C, N]``, C class centers per member.
        form: ``"tril"``, ``"full"`` or ``"diag"``.
        eps: ``>= 0``, added under the square root: ``d >= sqrt(eps)`` and the gradient at
            ``x = c`` is finite (zero).

    Returns:
        ``[B, E, C]`` distances in ``x``'s dtype (logits are ``-d``); differentiable in ``x``,
        ``P`` and ``centers``.  NaN in an input propagates to the distances it enters.
    """
    code = _form(form, "mahalanobis")
    eps = _eps(eps, "mahalanobis")
    if torch.compiler.is_compiling():  # the fake kernel checks nothing
        check_inputs("mahalanobis", x, P, centers, form)
        d = MAHALANOBIS(x, P, centers, code, eps)[0]
    else:
        try:
            d = MAHALANOBIS(x, P, centers, code, eps)[0]
        except Exception:
            check_inputs("mahalanobis", x, P, centers, form)  # names the argument at fault, if one is
            raise
    return d if d.dtype == x.dtype else d.to(x.dtype)


def randomized_mahalanobis(x: torch.Tensor, P: torch.Tensor, centers: torch.Tensor, *, sigma: float,
                           samples: int | None = None, seed: int | None = None,
                           noise: torch.Tensor | None = None, form: str = "tril",
                           eps: float = 1e-12) -> torch.Tensor:
    """Randomized DML (eq. 4-5): the mean of :func:`mahalanobis` over T perturbed factors.

    ``mean_t sqrt(||(F_e + sigma Z[t, e]) (x_b - centers[e, c])||^2 + eps)`` with ``Z[t, e]``
    i.i.d. standard normal ``N x N`` matrices (for every form: a perturbed diagonal or
    triangular factor is a full matrix, as in the paper's isotropic perturbation of ``P``).

    Args:
        x, P, centers, form, eps: as for :func:`mahalanobis`.
        sigma: noise scale, ``>= 0`` (``0`` gives the deterministic op).
        samples: T ``>= 1`` (may be omitted when ``noise`` is given).
        seed: int in ``[0, 2**63)``: the draws are Philox4x32-10 counters of the flat index
            into ``[T, E, N, N]`` (:func:`mahalanobis_noise`), identical on every backend.
            ``None`` draws a seed from torch's default generator (``torch.manual_seed``
            governs it).  The backward reuses the forward's draws.
        noise: optional explicit draws ``[T, E, N, N]`` (overrides ``seed``), e.g. to compare
            backends on the same values.

    Returns:
        ``[B, E, C]`` in ``x``'s dtype, differentiable in ``x``, ``P`` and ``centers``.
    """
    fn = "randomized_mahalanobis"
    code = _form(form, fn)
    check_inputs(fn, x, P, centers, form)
    eps = _eps(eps, fn)
    sigma = real_arg(sigma, f"{fn}: sigma", allow_inf=False)
    noise, T = _noise(noise, samples, x, centers, fn)
    seed_t = _seed(seed, fn) if noise is None else torch.zeros((), dtype=torch.int64)
    d = RANDOMIZED(x, P, centers, noise, seed_t, T, sigma, code, eps)
    return d if d.dtype == x.dtype else d.to(x.dtype)


def mahalanobis_noise(seed: int, shape, device: str | torch.device = "cpu") -> torch.Tensor:
    """The float32 standard normal draws ``randomized_mahalanobis`` uses for ``seed``: shape ``[T, E, N, N]``."""
    seed_t = _seed(seed, "mahalanobis_noise")
    like = torch.empty(0, device=device)
    return _kernels(like).noise(like, int(seed_t), [int(s) for s in shape])
