"""Shared fixtures: which backends to test, tolerances, and a mismatch printer.

Triton kernels are checked on the CPU through Triton's interpreter, so TRITON_INTERPRET must
be set before anything imports triton (the variable is read when a kernel is decorated).
"""
import os

import pytest
import torch
from hypothesis import settings

# Hypothesis profiles: "ci" (the default) keeps hypothesis' 100 examples and drops the deadline
# (CPU timing on shared CI machines is noisy); tests/test_fuzz.py sizes its budgets from the
# loaded profile's max_examples, so HYPOTHESIS_PROFILE=fuzz-long runs ten times as many fuzz
# examples (a longer run by hand; tests with their own max_examples keep it).
settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile("fuzz-long", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyens.ops import available_backends  # noqa: E402

# Backends every test run must have: a build that lost one fails instead of silently skipping
# its tests. The C++ CPU kernels always build and `.[test]` installs triton; set
# PYENS_REQUIRE_BACKENDS to change the list (e.g. "" for a deliberately partial install).
REQUIRED = {b for b in os.environ.get("PYENS_REQUIRE_BACKENDS", "cpu,triton").split(",") if b}
TOLERANCES = {  # (rtol, atol) per dtype, on values of order eps
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def backend_params(op: str, candidates=("reference", "cpu", "triton")):
    """pytest params for every backend; unavailable ones are skipped with the reason."""
    out = []
    usable = available_backends(op, "cpu")
    for name in candidates:
        marks = []
        if name not in usable and name not in REQUIRED:
            from pyens.ops._backend import OPS

            marks.append(pytest.mark.skip(reason=f"{name}: {OPS[op].why_not(name, 'cpu')}"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str = ""):
    """allclose that names the worst mismatching indices instead of a bare failure."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = "; ".join(f"{tuple(i)}: got {actual[tuple(i)].item():.9g}, want {expected[tuple(i)].item():.9g}" for i in idx)
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} values differ (max err {err.max().item():.3g}); {rows}")
