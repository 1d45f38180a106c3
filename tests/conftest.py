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

# The first-use self-check (pyens.ops.selftest) caches its verdicts on disk: a fresh directory
# per session, so that no run reads another's verdict or writes to the user's cache.
if "PYENS_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PYENS_CACHE_DIR"] = tempfile.mkdtemp(prefix="pyens-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PYENS_CACHE_DIR"], True)

from pyens.ops import available_backends  # noqa: E402
from pyens.ops.selftest import TOLERANCES  # noqa: E402,F401 - (rtol, atol) per dtype, shared with pyens selftest

# Backends every test run must have: a build that lost one fails instead of silently skipping
# its tests. The C++ CPU kernels always build and `.[test]` installs triton; set
# PYENS_REQUIRE_BACKENDS to change the list (e.g. "" for a deliberately partial install).
REQUIRED = {b for b in os.environ.get("PYENS_REQUIRE_BACKENDS", "cpu,triton").split(",") if b}
CUDA = torch.cuda.is_available()
if CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    # On a GPU host Triton runs CUDA tensors (the tests marked cuda), not CPU ones: its
    # CPU-tensor tests skip with the reason instead of failing for it.
    REQUIRED.discard("triton")
# Where device-parametrized tests run: the CPU always; CUDA tensors on a GPU host (marked cuda,
# so that `pytest -m cuda` selects them), skipped with the reason elsewhere.
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
               not CUDA, reason="no CUDA device is visible to torch")])]


# The two ways an eager call of a public op runs (pyens.ops.dispatch.RegisteredOp): its fast
# path, and through the registered torch.library op (the path of torch.compile and opcheck);
# the ops' correctness tests run both.
CALL_PATHS = ["function", "op"]


def backend_params(op: str, candidates=("reference", "cpu", "triton")):
    """pytest params for every backend; unavailable ones are skipped with the reason."""
    out = []
    usable = available_backends(op, "cpu")
    for name in candidates:
        marks = []
        if name not in usable and name not in REQUIRED:
            from pyens.ops.dispatch import OPS

            marks.append(pytest.mark.skip(reason=f"{name}: {OPS[op].why_not(name, 'cpu')}"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def gpu_backend_params(op: str, candidates=("cuda", "triton")):
    """pytest params (marked cuda) for the backends that run ``op`` on CUDA tensors; skipped
    with the reason where they cannot (no GPU, a CPU build, no triton)."""
    from pyens.ops.dispatch import OPS

    out = []
    for name in candidates:
        why = OPS[op].why_not(name, "cuda")
        marks = [pytest.mark.cuda] + ([pytest.mark.skip(reason=f"{name} on cuda: {why}")] if why else [])
        out.append(pytest.param(name, marks=marks, id=f"{name}-cuda"))
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
