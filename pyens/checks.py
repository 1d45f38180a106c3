"""Argument checks every layer of pyens imports (ops, nn, attacks, data, training configs).

One order for all: a checker takes ``(value, name, ...)``, the value first (as in
``isinstance(obj, cls)``), then the argument's name, then any options; it returns the value
checked and normalised, and every error it raises names the argument.

* :func:`positive_int`: sizes and counts of models, configs and attacks (members, steps,
  restarts, an attack's ``k``): an int >= 1, any other value a ValueError.
* :func:`count_arg`: the ops' per-member parameters (``k``): a TypeError for a non-int, and a
  ``k`` beyond int64 means "longer than any row". Two integer checks on purpose: the ops
  separate the wrong type from the wrong value.
* :func:`real_arg`: a real number >= 0 (radii, step sizes, noise scales); infinity only where
  the caller allows it.
* :func:`probability`: a float in [0, 1].
* :func:`flag_arg`: True or False, so that a string such as ``"no"`` is never read as True.
* :func:`choice_arg`: one of a few named options.
* :func:`box_arg`: a pixel range ``(lo, hi)``, finite, ``lo <= hi``.
* :func:`integer_labels`: a tensor of class labels.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


def positive_int(value, name: str) -> int:
    """``value`` as an int >= 1 (bool, float and strings rejected); errors name ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def integer_labels(y, name: str) -> None:
    """``y`` must be an integer tensor (class labels); bool and float tensors are rejected."""
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class labels, got {getattr(y, 'dtype', type(y).__name__)}")


def probability(value, name: str) -> float:
    """``value`` as a float in [0, 1] (NaN rejected); errors name ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def real_arg(value, name: str, *, allow_inf: bool = False) -> float:
    """``value`` as a float >= 0 (a 0-dim tensor too): finite, or also ``inf`` with ``allow_inf``
    (an unbounded radius). A non-real (bool included) is a TypeError; NaN, a negative value
    and a forbidden infinity are ValueErrors. An int beyond the float range is infinite."""
    if type(value) is float and 0.0 <= value and (allow_inf or value != math.inf):  # the common case, fast
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range: an infinite radius or step
        value = math.inf if value > 0 else -math.inf
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite{' or inf' if allow_inf else ''}, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def count_arg(value, name: str) -> int:
    """An int >= 1 (TypeError for any other type, ValueError below 1), capped at int64's max."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    # k beyond int64 (the kernels' int[] schema) means the same as any k longer than the row.
    return min(int(value), 2**63 - 1)


def flag_arg(value, name: str) -> bool:
    """``value`` as a bool: True or False (numpy's bool scalar too); anything else, such as a
    string ``"no"`` that ``bool()`` would read as True, is a TypeError."""
    # numpy's bool scalar: its type is named "bool_" before numpy 2 and "bool" since.
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not isinstance(value, bool) and not numpy_bool:
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def choice_arg(value, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices`` (an option named by a string), else a ValueError."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def box_arg(box, name: str = "box") -> tuple[float, float]:
    """A pixel range ``box = (lo, hi)`` as two floats: a pair of real numbers (0-dim tensors
    too; strings rejected), both finite, ``lo <= hi``; errors (ValueErrors) name ``name``."""
    try:
        lo, hi = box
        if isinstance(lo, (str, bytes)) or isinstance(hi, (str, bytes)):
            raise TypeError  # float("0") would take a digit string for a number
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a pair (lo, hi) of numbers, got {box!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name} must be finite with lo <= hi, got {box!r}")
    return lo, hi
