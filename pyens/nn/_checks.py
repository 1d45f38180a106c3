"""Argument checks shared by the nn constructors; messages name the argument."""


def positive_int(arg: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be a positive int; got {value!r}")
    return value
