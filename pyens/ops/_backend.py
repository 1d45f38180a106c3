"""Backend choice shared by every op: which implementation runs for a device and dtype.

Each op has up to four implementations (docs/ops.md, "Backends"): ``cuda`` (csrc/*.cu), ``triton``
(kernels/), ``cpu`` (csrc/*.cpp) and ``reference`` (pyens/reference).  Nothing here touches a
GPU or imports a compiled part at import time: availability is probed on first use and
cached, and a backend that cannot load only records *why*, which ``backends()`` reports and
the error of a forced-but-unavailable backend repeats.

Forcing: ``PYENS_BACKEND=<name>`` in the environment, or ``with use_backend(name):`` (which
wins over the environment, and nests).  ``"auto"`` restores the automatic choice.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
# Automatic preference per device type. Triton runs CPU tensors only in its interpreter,
# which is a correctness tool, not a fast path, so on the CPU it is used only when forced.
PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("pyens_backend", default=None)


def _env_reader(name: str) -> Callable[[], str | None]:
    """``os.environ.get(name)`` for the per-call backend choice, without its key encoding.

    ``os.environ.get`` encodes the key and decodes the value on every call (~2 us here, a
    tenth of a small op's Python path); this reads the mapping's own store, which every
    assignment through ``os.environ`` (and pytest's monkeypatch) updates, with the key encoded
    once. Falls back to ``os.environ.get`` where that store is not exposed.
    """
    data, encode, decode = (getattr(os.environ, a, None) for a in ("_data", "encodekey", "decodevalue"))
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda: os.environ.get(name)
    key = encode(name)

    def read() -> str | None:
        value = data.get(key)
        return None if value is None else decode(value)

    return read


_env_backend = _env_reader("PYENS_BACKEND")
_env_triton_interpret = _env_reader("TRITON_INTERPRET")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call; the message says why."""


@functools.lru_cache(maxsize=None)
def _compiled() -> tuple[object | None, str | None]:
    """(pyens._C, None) or (None, why it cannot be imported)."""
    try:
        return importlib.import_module("pyens._C"), None
    except ImportError as exc:
        return None, f"the compiled extension pyens._C is not importable ({exc}); reinstall with `pip install --no-build-isolation -e .`"


def build_info() -> dict:
    """What pyens._C was built with (empty when it is not importable)."""
    mod, _ = _compiled()
    return dict(mod.build_info()) if mod is not None else {}


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({exc.__class__.__name__}: {exc}); `pip install triton`"
    return None


def _cuda_device_missing() -> str | None:
    # torch.cuda.is_available() does not create a context; it is only called on first use.
    return None if torch.cuda.is_available() else "no CUDA device is visible to torch"


def _why_not_backend(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run on ``device_type`` at all (None: it can)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if device_type == "cuda" and _cuda_device_missing():
        return _cuda_device_missing()
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the C++ CPU kernels take CPU tensors, not {device_type}"
        return _compiled()[1]
    if backend == "cuda":
        if device_type != "cuda":
            return f"the CUDA kernels take CUDA tensors, not {device_type}"
        mod, why = _compiled()
        if mod is None:
            return why
        info = mod.build_info()
        if not info.get("cuda"):
            return f"pyens._C was built without CUDA ({info.get('cuda_note') or 'no reason recorded'})"
        return None
    if backend == "triton":
        why = _triton_import_error()
        if why:
            return why
        if device_type == "cuda":
            return None
        if device_type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
            return None
        return f"Triton does not run on {device_type}"
    return None


@dataclass
class Kernel:
    """One backend's implementation of one op and what it supports."""

    backend: str
    load: Callable[[], Callable]  # imports lazily; returns the kernel function
    dtypes: frozenset = _FLOATS
    max_n: int | None = None  # longest row the kernel takes (None: any)


@dataclass
class Op:
    """An op's backends; chooses one per call."""

    name: str
    kernels: dict[str, Kernel] = field(default_factory=dict)
    _fell_back: set = field(default_factory=set)
    _chosen: dict = field(default_factory=dict)

    def why_not(self, backend: str, device_type: str, dtype: torch.dtype | None = None,
                n: int | None = None) -> str | None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'")
        kernel = self.kernels.get(backend)
        if kernel is None:
            return f"{self.name} has no {backend} implementation"
        why = _why_not_backend(backend, device_type)
        if why:
            return why
        if dtype is not None and dtype not in kernel.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in kernel.dtypes))
            return f"the {backend} kernel of {self.name} takes {names}, not {str(dtype).replace('torch.', '')}"
        if n is not None and kernel.max_n is not None and n > kernel.max_n:
            return f"the {backend} kernel of {self.name} takes rows of at most {kernel.max_n} values, got {n}"
        return None

    def select(self, device: torch.device, dtype: torch.dtype, n: int) -> tuple[str, Callable]:
        """The backend name and kernel that run a call on ``device``/``dtype`` with rows of ``n``."""
        forced = current_forced()
        # Availability does not change within a process except through the environment
        # variables read here, so the choice is cached per situation (a PGD loop asks the
        # same question every step).
        fits = tuple(n <= k.max_n for k in self.kernels.values() if k.max_n is not None)
        key = (forced, device.type, dtype, fits, _env_triton_interpret())
        hit = self._chosen.get(key)
        if hit is None:
            hit = self._chosen[key] = self._select(forced, device, dtype, n)
        return hit

    def _select(self, forced: str | None, device: torch.device, dtype: torch.dtype, n: int) -> tuple[str, Callable]:
        if forced is not None:
            why = self.why_not(forced, device.type, dtype, n)
            if why:
                raise BackendUnavailableError(
                    f"backend {forced!r} was forced (PYENS_BACKEND / use_backend) but cannot run "
                    f"{self.name} on {device.type} {str(dtype).replace('torch.', '')}: {why}")
            return forced, self.kernels[forced].load()
        preference = PREFERENCE.get(device.type, ("reference",))
        for backend in preference:
            if self.why_not(backend, device.type, dtype, n) is None:
                if backend != preference[0]:
                    self._warn_fallback(preference[0], backend, device.type, dtype, n)
                return backend, self.kernels[backend].load()
        raise BackendUnavailableError(f"no backend can run {self.name} on {device.type} {dtype}")

    def _warn_fallback(self, wanted, got, device_type, dtype, n):
        key = (wanted, got, device_type)
        if key in self._fell_back:
            return
        self._fell_back.add(key)
        warnings.warn(f"pyens: {self.name} on {device_type} runs on the {got} backend: "
                      f"{wanted} is unavailable ({self.why_not(wanted, device_type, dtype, n)})",
                      RuntimeWarning, stacklevel=4)

    def report(self, device_type: str, dtype: torch.dtype = torch.float32) -> dict:
        """``{"selected": name | None, "why_not": {backend: reason}}`` for one device."""
        why = {b: self.why_not(b, device_type, dtype) for b in BACKENDS}
        forced = current_forced()
        if forced is not None:
            selected = forced if why[forced] is None else None
        else:
            selected = next((b for b in PREFERENCE.get(device_type, ("reference",)) if why[b] is None), None)
        return {"selected": selected, "why_not": {b: r for b, r in why.items() if r}}


OPS: dict[str, Op] = {}


def register_op(op: Op) -> Op:
    OPS[op.name] = op
    return op


def forget_choices() -> None:
    """Forget every op's cached backend choice and the fallbacks already warned about.

    For tests and long-lived processes whose environment changed: the next call of each op
    chooses again, and warns again if it falls back.
    """
    for op in OPS.values():
        op._chosen.clear()
        op._fell_back.clear()


def current_forced() -> str | None:
    """The forced backend (context manager first, then PYENS_BACKEND), or None for auto."""
    name = _forced.get()
    if name is None:
        name = _env_backend() or None
    if name is None or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"PYENS_BACKEND / use_backend got {name!r}; expected one of {BACKENDS} or 'auto'")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every pyens op inside the block onto backend ``name`` (or ``"auto"``)."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS} or 'auto', got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def backends(dtype: torch.dtype = torch.float32) -> dict[str, dict[str, dict]]:
    """Per op and device (``cpu``, ``cuda``): the backend that would run and why the others can't.

    Example: ``backends()["lp_step"]["cpu"] == {"selected": "cpu", "why_not": {...}}``.
    """
    return {name: {dev: op.report(dev, dtype) for dev in ("cpu", "cuda")} for name, op in OPS.items()}


def available_backends(op: str, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> list[str]:
    """The backends that can run ``op`` on ``device`` (any index) in ``dtype``, fastest first."""
    device_type = torch.device(device).type
    return [b for b in BACKENDS if OPS[op].why_not(b, device_type, dtype) is None]
