"""Plain-PyTorch, float64-capable references of every op: ground truth for tests, baseline for benches."""
from pyens.reference import lp_step, mahalanobis

__all__ = ["lp_step", "mahalanobis"]
