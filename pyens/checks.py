"""Argument checks every layer of pyens imports (ops, nn, attacks' inputs, data, training
configs); each error names the argument.

Two integer checks, on purpose: :func:`positive_int` for sizes and counts of models and
configs (any non-int is a ValueError), and :func:`count_arg` for the ops' per-member
parameters (a TypeError for a non-int, and a ``k`` beyond int64 means "longer than any row").
"""
from __future__ import annotations

import math
import numbers

import torch


def positive_int(arg: str, value) -> int:
    """``value`` as an int >= 1 (bool, float and strings rejected); errors name ``arg``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{arg} must be a positive int; got {value!r}")
    return int(value)


def integer_labels(arg: str, y) -> None:
    """``y`` must be an integer tensor (class labels); bool and float tensors are rejected."""
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{arg} must be an integer tensor of class labels, got {getattr(y, 'dtype', type(y).__name__)}")


def probability(arg: str, value) -> float:
    """``value`` as a float in [0, 1] (NaN rejected); errors name ``arg``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{arg} must be in [0, 1], got {value!r}")
    return value


def real_arg(v, name: str, *, allow_inf: bool) -> float:
    """A real number >= 0 (a 0-dim tensor too): NaN, negative values, and infinity unless
    ``allow_inf`` raise errors naming ``name``; an int beyond the float range is infinite."""
    if type(v) is float and 0.0 <= v and (allow_inf or v != math.inf):  # the common case, fast
        return v
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        v = v.item()
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    try:
        v = float(v)
    except OverflowError:  # an int beyond the float range: an infinite radius or step
        v = math.inf if v > 0 else -math.inf
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {v}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def count_arg(v, name: str) -> int:
    """An int >= 1 (TypeError for any other type, ValueError below 1), capped at int64's max."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    # k beyond int64 (the kernels' int[] schema) means the same as any k longer than the row.
    return min(int(v), 2**63 - 1)
