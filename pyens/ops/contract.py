"""The ops' contract shared by every backend: codes, flag bits, forms and accumulation dtypes.

The public ops (:mod:`pyens.ops.lp_step`, :mod:`pyens.ops.mahalanobis`), the kernels of every
backend and the float64 references read these from here; the C++ headers (``csrc/lp_step.h``,
``csrc/mahalanobis.h``) spell the same numbers, and ``tests/test_contract.py`` checks that
they agree. docs/ops.md gives the semantics.
"""
from __future__ import annotations

import torch

# lp_step: the norm of each member (``norm`` argument) and the operation (``mode``).
LINF, L2, L1 = 0, 1, 2
NORM_CODES = {"linf": LINF, "l2": L2, "l1": L1}
PROJECT, DIRECTION, STEP = 0, 1, 2
# lp_project / lp_step: onto the intersection of ball and box, or ball then box clamp.
PROJECTIONS = ("exact", "sequential")
# Bits of the flag every lp kernel returns: which argument held NaN or infinity (the op
# wrapper raises an error naming it).
BAD_DELTA, BAD_GRAD, BAD_X = 1, 2, 4

# mahalanobis: the form of the factor ``P`` (docs/mahalanobis.md).
DIAG, TRIL, FULL = 0, 1, 2
FORMS = {"diag": DIAG, "tril": TRIL, "full": FULL}
FORM_NAMES = {v: k for k, v in FORMS.items()}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op computes in: float64 stays float64; every other dtype runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
