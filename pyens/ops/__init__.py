"""Public functional ops of pyens and their backend choice.

``import pyens.ops`` never imports a compiled part or touches a GPU; backends are probed on
first use. See :func:`backends` for what would run where, and :func:`use_backend` /
``PYENS_BACKEND`` to force one.
"""
from pyens.ops.dispatch import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backends,
    build_info,
    use_backend,
)
from pyens.ops.lp_step import lp_project, lp_step, steepest_direction
from pyens.ops.mahalanobis import mahalanobis, mahalanobis_noise, randomized_mahalanobis

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backends",
    "build_info",
    "lp_project",
    "lp_step",
    "mahalanobis",
    "mahalanobis_noise",
    "randomized_mahalanobis",
    "steepest_direction",
    "use_backend",
]
