"""Argument checks shared by the nn constructors; messages name the argument."""
import numbers


def positive_int(arg: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{arg} must be a positive int; got {value!r}")
    return int(value)


def integer_labels(arg: str, y) -> None:
    """``y`` must be an integer tensor (class labels); bool and float tensors are rejected."""
    import torch

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
