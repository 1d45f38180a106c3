"""Fixtures of the pyens benchmark suites (``bench/``; never collected by ``pytest tests/``).

``--device cpu|cuda`` picks where the suites run (default ``cpu``).  The option is
registered defensively: if another conftest already defines ``--device``, that
definition is used and this one steps aside instead of breaking collection.
"""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    try:
        parser.addoption(
            "--device",
            action="store",
            default="cpu",
            choices=("cpu", "cuda"),
            help="pyens benchmarks: device to run on (default: cpu)",
        )
    except ValueError:  # already defined by another conftest / plugin
        pass


def bench_device(config) -> str:
    """The ``--device`` the benchmarks run on (``"cpu"`` when the option is absent)."""
    try:
        value = config.getoption("--device")
    except ValueError:
        value = None
    return str(value or "cpu")


@pytest.fixture(scope="session")
def device(request) -> str:
    """``"cpu"`` or ``"cuda"``; skips the session's CUDA benchmarks when no GPU is visible."""
    import torch

    name = bench_device(request.config)
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but torch.cuda.is_available() is False")
    return name
