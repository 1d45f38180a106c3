"""pyens: compiled kernels, training and evaluation for adversarially robust ensembles.

Two methods are its core: MAT (MIMO adversarial training) and DML ensembles (distance map
layers). The fused ops live in :mod:`pyens.ops`; importing pyens never requires a compiled
backend or a GPU, and the heavier parts (training, evaluation, attacks) load on first use.

    result = pyens.train("mat", dataset="mnist", epochs=5)       # see pyens.training
"""
__version__ = "0.1.0"

import importlib

from pyens import ops, reference  # noqa: E402

_LAZY_MODULES = ("attacks", "data", "ensembles", "eval", "nn", "training")
_LAZY_FUNCTIONS = {"train": "pyens.training", "load_run": "pyens.training", "evaluate": "pyens.eval"}


def __getattr__(name: str):
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"pyens.{name}")
    raise AttributeError(f"module 'pyens' has no attribute {name!r}")


__all__ = ["ops", "reference", "train", "evaluate", "load_run", "__version__", *_LAZY_MODULES]
