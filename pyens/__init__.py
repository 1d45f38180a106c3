"""pyens: compiled kernels, training and evaluation for adversarially robust ensembles.

Two methods are its core: MAT (MIMO adversarial training) and DML ensembles (distance map
layers). The fused ops live in :mod:`pyens.ops`; importing pyens never requires a compiled
backend or a GPU.
"""
__version__ = "0.1.0"

from pyens import ops, reference  # noqa: E402

__all__ = ["ops", "reference", "__version__"]
