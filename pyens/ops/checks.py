"""Argument checks of the ops' public functions; every error names the argument.

The ops share them (lp_step's eps/alpha/k, mahalanobis' eps/sigma/samples) so that one kind
of argument is checked, and worded, the same way everywhere.
"""
from __future__ import annotations

import math
import numbers

import torch


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
