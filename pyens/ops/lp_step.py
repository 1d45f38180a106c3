"""The lp step family: ``lp_project``, ``steepest_direction`` and the fused ``lp_step``.

These are the inner loop of PGD-based adversarial training and of MAT (MAT paper, eq. 6):

    delta <- Π_{B_p(eps) ∩ box}( delta + alpha * V_p(grad) )

Each public function checks its arguments (errors name the argument), reshapes the input to
rows ``[R, n]`` and calls its :class:`~pyens.ops.dispatch.RegisteredOp`: the ``torch.library``
custom op (``pyens::lp_step`` etc., whose fake kernel makes it traceable by
``torch.compile(fullgraph=True)``) or, in eager mode, the same implementation without the
dispatcher's 18-54 us a call (docs/performance.md, "Eager calls and the registered op"). The implementation picks
a backend (:mod:`pyens.ops.dispatch`) and runs that backend's ``lp_rows`` kernel; all
backends share this schema, these checks and the finite-input check, and differ only in the
kernel. Outputs never carry autograd history (the step is not differentiated through).

Member layout (MIMO / MAT): with ``members=M``, inputs are ``[B, M, ...]`` and every
(sample, member) row uses its member's parameters (``norm``/``eps``/``alpha``/``k`` as length-M
sequences, or scalars shared by all members); all members run in ONE kernel launch. Sequence
parameters require ``members=``: without it a ``[B, C, H, W]`` image batch with three norms
would silently take its RGB channels for members.

    x = torch.rand(128, 3, 1, 28, 28)                       # [B, M, C, H, W]
    delta = lp_step(delta, grad, x, norm=("l1", "l2", "linf"), eps=(10, 2.0, 0.3),
                    alpha=(0.8, 0.1, 0.01), k=20, members=3)
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import torch

from pyens.ops.dispatch import Kernel, Op, RegisteredOp, register_op
from pyens.checks import box_arg, choice_arg, count_arg, positive_int, real_arg
from pyens.ops.contract import DIRECTION, L1, L2, LINF, PROJECT, PROJECTIONS, STEP, acc_dtype

Norm = Union[str, float, int]
_NORMS = {"linf": LINF, "inf": LINF, "l2": L2, "2": L2, "l1": L1, "1": L1}


def _load_cpu():
    from pyens.ops.dispatch import compiled_extension

    compiled_extension()  # importing pyens._C registers pyens_C::lp_rows
    return torch.ops.pyens_C.lp_rows


def _load_triton():
    from pyens.kernels.lp_step import lp_rows

    return lp_rows


def _load_reference():
    from pyens.reference.lp_step import lp_rows

    return lp_rows


# The longest row the Triton kernel takes: pyens.kernels.lp_step.MAX_N, repeated here so that
# choosing a backend does not import triton (a test checks that the two agree).
TRITON_MAX_N = 65536


_CPU_DTYPES = frozenset({torch.float32, torch.float64})
# The largest alpha per computation dtype: the l2 kernels square delta + alpha * v, and past
# sqrt(max) that square is infinite (the step then came back as NaN, or as 0 instead of the
# projection; in float32 an alpha past max itself also hung the l1 root search).
_ALPHA_MAX = {torch.float32: math.sqrt(torch.finfo(torch.float32).max),
              torch.float64: math.sqrt(torch.finfo(torch.float64).max)}
OP = register_op(Op("lp_step", {
    # One compiled schema: the dispatcher routes CUDA tensors to the .cu kernel.
    "cuda": Kernel("cuda", _load_cpu),
    "triton": Kernel("triton", _load_triton, max_n=TRITON_MAX_N),
    "cpu": Kernel("cpu", _load_cpu, dtypes=_CPU_DTYPES),
    "reference": Kernel("reference", _load_reference),
}))


# ---------------------------------------------------------------------------------------------
# argument checks (shared by the three public functions)

def norm_code(norm: Norm, name: str = "norm") -> int:
    """``"linf"``/``inf`` -> 0, ``"l2"``/2 -> 1, ``"l1"``/1 -> 2."""
    if isinstance(norm, str):
        key = norm.strip().lower().replace("_", "")
        if key in _NORMS:
            return _NORMS[key]
    elif isinstance(norm, numbers.Real) and not isinstance(norm, bool):
        if math.isinf(norm) and norm > 0:
            return LINF
        if norm == 2:
            return L2
        if norm == 1:
            return L1
    raise ValueError(f"{name} must be 'linf', 'l2' or 'l1' (or inf, 2, 1), got {norm!r}")


def _is_seq(v) -> bool:
    return isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() == 1)


def _as_list(v, m: int, name: str) -> list:
    if _is_seq(v):
        vals = v.tolist() if isinstance(v, torch.Tensor) else list(v)
        if len(vals) != m:
            raise ValueError(f"{name} must have one entry per member ({m}), got {len(vals)}")
        return vals
    return [v] * m


def member_params(norm, eps=0.0, alpha=0.0, k=20, members: int | None = None):
    """Expand scalar-or-sequence parameters to M-long lists; M = 0 means no member dimension."""
    if torch.compiler.is_compiling():  # Dynamo need not trace the cache: parse directly
        m, norms, epss, alphas, ks = _member_params(norm, eps, alpha, k, members)
        return m, list(norms), list(epss), list(alphas), list(ks)
    # A PGD loop passes the same parameters every step: parse them once.
    key = _cache_key((norm, eps, alpha, k, members))
    hit = _PARSED.get(key) if key is not None else None
    if hit is None:
        hit = tuple(tuple(v) if isinstance(v, list) else v for v in _member_params(norm, eps, alpha, k, members))
        if key is not None:
            if len(_PARSED) >= 256:
                _PARSED.clear()
            _PARSED[key] = hit
    m, norms, epss, alphas, ks = hit
    return m, list(norms), list(epss), list(alphas), list(ks)


_PARSED: dict = {}
_PLAIN = frozenset({str, int, float, bool, type(None)})


def _cache_key(args) -> tuple | None:
    """The parse cache's key, with the types in it (1, 1.0 and True are equal, but only 1 is a
    valid k); None for anything but plain scalars and lists/tuples of them (a tensor hashes by
    identity: changed in place, it would be served its old parse)."""
    key = []
    for v in args:
        t = type(v)
        if t in _PLAIN:
            key += (v, t)
        elif t is list or t is tuple:
            types = tuple(map(type, v))
            if not _PLAIN.issuperset(types):
                return None
            key += (tuple(v), types)
        else:
            return None
    return tuple(key)


def _member_params(norm, eps, alpha, k, members):
    lengths = {len(v) for v in (norm, eps, alpha, k) if _is_seq(v)}
    if len(lengths) > 1:
        raise ValueError(f"norm, eps, alpha and k given as sequences must share one length, got lengths {sorted(lengths)}")
    if members is not None:
        positive_int(members, "members")
        if lengths and lengths != {members}:
            raise ValueError(f"members={members} but the parameter sequences have length {lengths.pop()}")
    elif lengths:
        given = [name for name, v in zip(("norm", "eps", "alpha", "k"), (norm, eps, alpha, k)) if _is_seq(v)]
        m = lengths.pop()
        raise ValueError(f"{', '.join(given)} given per member (length {m}) need members={m}: the member "
                         f"layout is [B, {m}, ...] and must be asked for, or a [B, C, H, W] batch's channels "
                         "would be taken for members")
    m = members or 0
    width = max(m, 1)
    sfx = (lambda i: f"[{i}]") if m else (lambda i: "")
    norms = [norm_code(v, f"norm{sfx(i)}") for i, v in enumerate(_as_list(norm, width, "norm"))]
    epss = [real_arg(v, f"eps{sfx(i)}", allow_inf=True) for i, v in enumerate(_as_list(eps, width, "eps"))]
    alphas = [real_arg(v, f"alpha{sfx(i)}", allow_inf=False) for i, v in enumerate(_as_list(alpha, width, "alpha"))]
    ks = [count_arg(v, f"k{sfx(i)}") for i, v in enumerate(_as_list(k, width, "k"))]
    return m, norms, epss, alphas, ks


def _projection(projection: str) -> bool:
    """True for the exact projection onto the intersection (the kernels' ``exact`` flag)."""
    return choice_arg(projection, "projection", PROJECTIONS) == "exact"


def check_tensors(fn: str, members: int, **tensors: torch.Tensor) -> None:
    """Same shape/dtype/device, floating point, and the member dimension where there is one."""
    ref_name, ref = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.shape != ref.shape:
            raise ValueError(f"{fn}: {name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{fn}: {name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{fn}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}")
    if ref.dim() == 0:
        raise ValueError(f"{fn}: {ref_name} must have a batch dimension, got a 0-d tensor")
    if members and (ref.dim() < 2 or ref.shape[1] != members):
        raise ValueError(f"{fn}: with {members} members, {ref_name} must be [B, {members}, ...], got {tuple(ref.shape)}")


# ---------------------------------------------------------------------------------------------
# the custom ops

_BAD = ((1, "delta"), (2, "grad"), (4, "x"))


def _run(fn: str, mode: int, delta, grad, x, members, norms, eps, alpha, k, lo, hi, exact):
    shape = x.shape
    rows = shape[0] * (shape[1] if members else 1)
    out_dtype = grad.dtype if mode == DIRECTION else delta.dtype
    if x.numel() == 0 or x.device.type == "meta":  # meta tensors: the shape and dtype only, as the fake kernel
        return torch.empty(shape, dtype=out_dtype, device=x.device)
    n = x.numel() // rows
    d2, g2, x2 = (t.reshape(rows, n).contiguous() for t in (delta, grad, x))
    _, kernel = OP.select(x.device, x.dtype, n)
    out, flags = kernel(mode, d2, g2, x2, norms, eps, alpha, k, lo, hi, exact)
    bad = int(flags.item())
    if bad:
        names = [name for bit, name in _BAD if bad & bit]
        raise ValueError(f"{fn}: {', '.join(names)} contain{'s' if len(names) == 1 else ''} NaN or infinity")
    return out.view(shape)


def _lp_project_impl(delta: torch.Tensor, x: torch.Tensor, members: int, norms: list[int],
                     eps: list[float], lo: float, hi: float, exact: bool) -> torch.Tensor:
    m = len(norms)
    return _run("lp_project", PROJECT, delta, x, x, members, norms, eps, [0.0] * m, [1] * m, lo, hi, exact)


def _steepest_direction_impl(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, members: int,
                             norms: list[int], k: list[int], lo: float, hi: float) -> torch.Tensor:
    m = len(norms)
    return _run("steepest_direction", DIRECTION, delta, grad, x, members, norms, [0.0] * m, [0.0] * m, k, lo, hi, True)


def _lp_step_impl(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, members: int, norms: list[int],
                  eps: list[float], alpha: list[float], k: list[int], lo: float, hi: float,
                  exact: bool) -> torch.Tensor:
    # Here rather than in lp_step() so that a direct torch.ops.pyens.lp_step call is checked too.
    acc = acc_dtype(delta.dtype)  # docs/ops.md, "Dtypes"
    if alpha and max(alpha) > _ALPHA_MAX[acc]:
        i = max(range(len(alpha)), key=alpha.__getitem__)
        raise ValueError(f"lp_step: alpha{f'[{i}]' if members else ''} must be at most {_ALPHA_MAX[acc]:.4g} for "
                         f"{delta.dtype} inputs (computed in {str(acc).replace('torch.', '')}), got {alpha[i]}")
    return _run("lp_step", STEP, delta, grad, x, members, norms, eps, alpha, k, lo, hi, exact)


def _fake_project(delta, x, members, norms, eps, lo, hi, exact):
    return delta.new_empty(delta.shape)


def _fake_direction(grad, x, delta, members, norms, k, lo, hi):
    return grad.new_empty(grad.shape)


def _fake_step(delta, grad, x, members, norms, eps, alpha, k, lo, hi, exact):
    return delta.new_empty(delta.shape)


# No autograd: the step is not differentiated through (the public functions detach).
LP_PROJECT = RegisteredOp("lp_project", _lp_project_impl, fake=_fake_project)
STEEPEST_DIRECTION = RegisteredOp("steepest_direction", _steepest_direction_impl, fake=_fake_direction)
LP_STEP = RegisteredOp("lp_step", _lp_step_impl, fake=_fake_step)


# ---------------------------------------------------------------------------------------------
# public API

def lp_project(delta: torch.Tensor, x: torch.Tensor, *, norm: Norm | Sequence[Norm],
               eps: float | Sequence[float], box: tuple[float, float] = (0.0, 1.0),
               projection: str = "exact", members: int | None = None) -> torch.Tensor:
    """Euclidean projection of ``delta`` onto ``{||z||_p <= eps} ∩ {lo <= x + z <= hi}``.

    Args:
        delta: ``[B, ...]`` perturbations (or ``[B, M, ...]`` with members); one row per
            sample (per sample and member), flattened.
        x: clean inputs, same shape, dtype and device as ``delta``.
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` (or ``inf``, 2, 1); a length-M sequence gives
            each member its own (with ``members=M``).
        eps: radius in pixel units (``>= 0``), scalar or per member.
        box: ``(lo, hi)`` valid pixel range.
        projection: ``"exact"`` (onto the intersection; Croce & Hein 2021 for l1) or
            ``"sequential"`` (ball, then box clamp: torchattacks' and MSD's convention).
        members: number of members M on dim 1; required whenever a parameter is a sequence.

    Returns:
        The projected perturbation, ``delta``'s shape and dtype, no autograd history.
    """
    m, norms, epss, _, _ = member_params(norm, eps, 0.0, 1, members)
    check_tensors("lp_project", m, delta=delta, x=x)
    lo, hi = box_arg(box)
    return LP_PROJECT(
        delta.detach(), x.detach(), m, norms, epss, lo, hi, _projection(projection))


def steepest_direction(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor | None = None, *,
                       norm: Norm | Sequence[Norm], k: int | Sequence[int] = 20,
                       box: tuple[float, float] = (0.0, 1.0), members: int | None = None) -> torch.Tensor:
    """Unit-size steepest ascent direction ``V_p(grad)`` (MAT paper, eq. 1).

    linf: ``sign(grad)``; l2: ``grad / max(||grad||_2, 1e-12)``; l1: the ``k`` largest
    ``|grad|`` among coordinates that can still move (``x + delta`` not at the bound the
    gradient pushes towards, ``grad != 0``), ties to the lowest index, each
    ``sign(grad) / k_selected``.

    Args:
        grad: ``[B, ...]`` (or ``[B, M, ...]``) loss gradient w.r.t. the input.
        x, delta: clean input and current perturbation (same shape; ``delta`` defaults to 0).
        norm, k: norm and l1 sparsity (``k >= 1``), scalars or per member (with ``members=M``).
        members: number of members M on dim 1; required whenever a parameter is a sequence.
    """
    if delta is None and isinstance(x, torch.Tensor):
        delta = torch.zeros_like(x)
    m, norms, _, _, ks = member_params(norm, 0.0, 0.0, k, members)
    check_tensors("steepest_direction", m, grad=grad, x=x, delta=delta)
    lo, hi = box_arg(box)
    return STEEPEST_DIRECTION(
        grad.detach(), x.detach(), delta.detach(), m, norms, ks, lo, hi)


def lp_step(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, *, norm: Norm | Sequence[Norm],
            eps: float | Sequence[float], alpha: float | Sequence[float], k: int | Sequence[int] = 20,
            box: tuple[float, float] = (0.0, 1.0), projection: str = "exact",
            members: int | None = None) -> torch.Tensor:
    """One PGD step ``Π(delta + alpha * V_p(grad))`` in one fused pass (MAT paper, eq. 6).

    Args:
        delta: ``[B, ...]`` current perturbation, or ``[B, M, ...]`` for M members.
        grad: gradient of the (summed) loss w.r.t. the input, same shape.
        x: clean input, same shape, dtype and device.
        norm, eps, alpha, k: scalars, or length-M sequences for the member layout (each
            member its own norm, radius, step size and l1 sparsity, all in one launch).
        box: ``(lo, hi)``; projection: ``"exact"`` or ``"sequential"`` (see lp_project).
        members: number of members M on dim 1 (``[B, M, ...]``); required whenever a
            parameter is a sequence, so that an image batch's channels are never taken for
            members.

    Returns:
        The new perturbation, ``delta``'s shape and dtype, no autograd history.
    """
    m, norms, epss, alphas, ks = member_params(norm, eps, alpha, k, members)
    check_tensors("lp_step", m, delta=delta, grad=grad, x=x)
    lo, hi = box_arg(box)
    return LP_STEP(
        delta.detach(), grad.detach(), x.detach(), m, norms, epss, alphas, ks, lo, hi, _projection(projection))
