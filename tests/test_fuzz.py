"""Fuzzing the public surface (issue 17, item 4).

Hypothesis draws whole calls of ``pyens.ops.lp_step``, ``lp_project``, ``steepest_direction``,
``pyens.ops.mahalanobis``, ``pyens.attacks.PGD``, ``MSD``, ``mimo_pgd``, ``mimo_msd``,
``pyens.nn.MIMO``, ``pyens.nn.DistanceMap`` and ``pyens.evaluate``: random shapes (0-size
dimensions included), dtypes (float16/32/64, bfloat16, int, bool), CPU and meta tensors,
transposed / stepped / broadcast (stride 0) views, NaN and infinity, negative, huge and
ill-typed eps, alpha and k, labels outside [0, K), integer images, and arguments of the wrong
type. Each drawn call knows which of its arguments are invalid (its *faults*), and
:func:`_call` holds it to the contract:

- no fault: it returns a result, which is then checked: shape, dtype, device, no autograd
  history, inputs untouched, the constraints it promises (ball, box, union of balls, unit
  directions), and the values against the reference (``pyens.reference``: in float64 for
  float64 inputs and for the distance map; for the lp ops' lower-precision inputs, at the float32
  computation the contract specifies) or a float64 computation written out here;
- faults: it raises ``ValueError`` or ``TypeError`` whose message names one of them;
- anything else fails with the inputs printed: another exception type (a ``RuntimeError`` from
  torch's internals, an ``IndexError``, ...), C++ text in a message (``c10::``, ``Exception
  raised from``, ...), a wrong shape, or a hang (a watchdog ends the process after
  ``_WATCHDOG_S`` seconds and prints every thread's traceback, rather than letting CI stall).

Budgets: the ``ci`` profile of tests/conftest.py (loaded by default) runs the whole file in
about a minute on two cores; ``HYPOTHESIS_PROFILE=fuzz-long pytest tests/test_fuzz.py`` runs
ten times as many examples. Each ``@example`` is a bug this suite found, kept as a regression.
"""
from __future__ import annotations

import faulthandler
import math
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings, strategies as st
from hypothesis.control import currently_in_test_context

import pyens
from pyens.attacks import MSD, PGD, mimo_msd, mimo_pgd
from pyens.eval.catalogue import pgd_specs
from pyens.nn import MIMO, DistanceMap
from pyens.ops import lp_project, lp_step, mahalanobis, steepest_direction
from pyens.reference import lp_step as ref_lp
from pyens.reference import mahalanobis as ref_maha
from tests.conftest import TOLERANCES

# ---------------------------------------------------------------------------------------------
# the outcome classifier

_WATCHDOG_S = 120
_WATCHDOG_FD = None  # where a hang's tracebacks go: the terminal's stderr (see _hang_reports_reach_the_terminal)
# C++ exception text: what a TORCH_CHECK or a schema mismatch leaks when nothing catches it.
_LEAK = re.compile(r"c10::|\bat::|Exception raised from|INTERNAL ASSERT|\.(cpp|cu|h):\d+|Declaration:|pyens_C::")


@pytest.fixture(autouse=True, scope="module")
def _hang_reports_reach_the_terminal(pytestconfig):
    """The watchdog ends the process, and with it pytest's capture of fd 2: its tracebacks go
    to the stderr that capture saved (a private attribute of pytest's capture manager; when it
    is missing, to fd 2, where ``-s`` shows them)."""
    global _WATCHDOG_FD
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    err = getattr(getattr(capman, "_global_capturing", None), "err", None)
    saved = getattr(err, "targetfd_save", None)
    _WATCHDOG_FD = saved if isinstance(saved, int) else sys.__stderr__.fileno()
    yield


def _budget(share: int) -> int:
    """Examples for one test: ``share`` under the ``ci`` profile (max_examples=100), scaled with
    the loaded profile (``fuzz-long``: ten times as many)."""
    return max(1, share * settings.default.max_examples // 100)


def _chance(draw, p: float) -> bool:
    """True with probability about ``p``: a window in the middle of [0, 1000), since hypothesis
    leans on the ends of a range (a plain ``< p`` made every rare branch common)."""
    return 500 <= draw(st.integers(0, 999)) < 500 + p * 1000


def _dim(draw, hi: int, p_zero: float = 0.08) -> int:
    """A size in [1, hi], or 0 (an empty dimension) with probability ``p_zero``."""
    return 0 if _chance(draw, p_zero) else draw(st.integers(1, hi))


def _fuzz(share: int):
    return settings(max_examples=_budget(share), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _describe(v, depth: int = 0) -> str:
    if isinstance(v, torch.Tensor):
        s = f"Tensor{tuple(v.shape)} {v.dtype} on {v.device}, stride {v.stride()}"
        if v.requires_grad:
            s += ", requires_grad"
        if v.device.type != "meta" and v.numel():
            f = v.detach().double()
            bad = int((~torch.isfinite(f)).sum())
            fin = f[torch.isfinite(f)]
            s += f", {bad} non-finite" if bad else ""
            if fin.numel():
                s += f", finite values in [{fin.min().item():.6g}, {fin.max().item():.6g}]"
            if v.numel() <= 12:
                s += f": {v.detach().tolist()}"
        return s
    if isinstance(v, (list, tuple)) and depth < 2:
        inner = ", ".join(_describe(e, depth + 1) for e in v)
        return f"[{inner}]" if isinstance(v, list) else f"({inner}{',' if len(v) == 1 else ''})"
    if isinstance(v, dict) and depth < 2:
        return "{" + ", ".join(f"{k!r}: {_describe(e, depth + 1)}" for k, e in v.items()) + "}"
    if isinstance(v, torch.nn.Module):
        return type(v).__name__
    r = repr(v)
    return r if len(r) < 200 else r[:200] + "..."


def _event(what: str):
    if currently_in_test_context():  # _call also serves plain tests
        event(what)


def _names(msg: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg) is not None


def _call(fn, inputs: dict, faults=()):
    """Run ``fn()`` and classify the outcome (see the module docstring); returns its result, or
    None when it rightly raised. ``inputs`` are printed on any failure."""
    faults = tuple(faults)

    def where() -> str:
        lines = "\n".join(f"    {k} = {_describe(v)}" for k, v in inputs.items())
        return f"\n  inputs:\n{lines}\n  invalid arguments: {list(faults) or 'none'}"

    faulthandler.dump_traceback_later(_WATCHDOG_S, exit=True,
                                      file=_WATCHDOG_FD if _WATCHDOG_FD is not None else sys.__stderr__.fileno())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # backend fallback notes, not outcomes
            out = fn()
    except (ValueError, TypeError) as e:
        msg = f"{type(e).__name__}: {e}"
        if _LEAK.search(msg):
            pytest.fail(f"C++ exception text in the error: {msg}{where()}")
        if not faults:
            pytest.fail(f"valid call rejected: {msg}{where()}")
        if not any(_names(str(e), f) for f in faults):
            pytest.fail(f"the error names none of the invalid arguments {list(faults)}: {msg}{where()}")
        _event(f"rejected ({type(e).__name__})")
        return None
    except Exception as e:  # noqa: BLE001 - any other type is the failure being fuzzed for
        pytest.fail(f"{type(e).__name__} (only ValueError / TypeError may escape): {e}{where()}")
    finally:
        faulthandler.cancel_dump_traceback_later()
    if faults:
        pytest.fail(f"invalid call accepted, returned {_describe(out)}{where()}")
    _event("returned")
    return out


def _check(cond: bool, what: str, inputs: dict):
    if not cond:
        lines = "\n".join(f"    {k} = {_describe(v)}" for k, v in inputs.items())
        pytest.fail(f"{what}\n  inputs:\n{lines}")


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, what: str, inputs: dict,
           nonfinite_alike: bool = False):
    """NaN where the reference has NaN, the same infinities, and the finite values close
    (``nonfinite_alike``: only the same non-finite positions)."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    _check(g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != reference {tuple(w.shape)}", inputs)
    fin = torch.isfinite(w)
    if nonfinite_alike:
        same_nan = same_inf = torch.equal(torch.isfinite(g), fin)
    else:
        same_nan = torch.equal(torch.isnan(g), torch.isnan(w))
        same_inf = torch.equal(g[~fin & ~torch.isnan(w)], w[~fin & ~torch.isnan(w)])
    err = (g[fin] - w[fin]).abs()
    bad = err > atol + rtol * w[fin].abs()
    if not (same_nan and same_inf) or bool(bad.any()):
        idx = fin.nonzero()[bad.nonzero().flatten()][:4].tolist() if bad.any() else []
        rows = "; ".join(f"{tuple(i)}: got {g[tuple(i)].item():.9g}, want {w[tuple(i)].item():.9g}" for i in idx)
        _check(False, f"{what}: differs from the reference (NaN pattern equal: {same_nan}, infinities equal: "
                      f"{same_inf}, {int(bad.sum())} finite values off, max err "
                      f"{err.max().item() if err.numel() else 0:.3g}); {rows}", inputs)


def _snapshot(ts: dict) -> dict:
    return {k: t.detach().clone() for k, t in ts.items()
            if isinstance(t, torch.Tensor) and t.device.type != "meta"}


def _unchanged(before: dict, after: dict, inputs: dict):
    for k, t in before.items():
        _check(torch.equal(t.nan_to_num(), after[k].detach().nan_to_num()) and
               torch.equal(torch.isnan(t.double()), torch.isnan(after[k].detach().double())),
               f"input {k} was modified", inputs)


# ---------------------------------------------------------------------------------------------
# tensors: values from a seed, then a layout, a dtype and a device

FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
NON_FLOATS = {"int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool}
DTYPES = {**FLOATS, **NON_FLOATS}
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
PREFERRED_FLOATS = ("float32", "float64", "float16", "bfloat16")  # hypothesis favours the first
PREFERRED_DTYPES = (*PREFERRED_FLOATS, "int64", "uint8", "bool", "int32")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as a non-contiguous view: ``transposed`` (last two dims swapped in
    memory), ``strided`` (every other element of a larger buffer) or ``expanded`` (stride 0 on
    dim 0; ``t`` must then hold one row repeated)."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided" and t.dim() >= 1:
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "expanded" and t.dim() >= 1 and t.shape[0] > 0:
        return t[:1].expand(t.shape)
    return t


def _poison(t: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """``t`` (float64) with one element NaN / inf / -inf (on row 0, so it survives ``expanded``)."""
    t = t.clone()
    flat = t.view(-1)
    i = int(torch.randint(0, max(1, t[:1].numel() if t.dim() else 1), (1,), generator=gen))
    flat[i] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[kind]
    return t


def _finish(t64: torch.Tensor, dtype: str, device: str, layout: str) -> torch.Tensor:
    """float64 values -> the drawn dtype (integer kinds round, bool thresholds), layout and device."""
    if dtype == "bool":
        t = t64 > 0.5
    elif dtype in NON_FLOATS:
        t = t64.nan_to_num(0, 0, 0).clamp(-100, 100).round().to(DTYPES[dtype])
    else:
        t = t64.to(DTYPES[dtype])
    return _layout(t, layout).to(device)


# ---------------------------------------------------------------------------------------------
# lp_step / lp_project / steepest_direction

OPS = {"lp_step": lp_step, "lp_project": lp_project, "steepest_direction": steepest_direction}
MODES = {"lp_project": ref_lp.PROJECT, "steepest_direction": ref_lp.DIRECTION, "lp_step": ref_lp.STEP}
TENSORS = {"lp_step": ("delta", "grad", "x"), "lp_project": ("delta", "x"), "steepest_direction": ("grad", "x", "delta")}
PARAMS = {"lp_step": ("norm", "eps", "alpha", "k"), "lp_project": ("norm", "eps"), "steepest_direction": ("norm", "k")}

# (value, canonical) for valid values; invalid values alone. Canonical values are written out
# from docs/ops.md, not taken from the code under test.
GOOD = {
    "norm": [("linf", 0), ("l2", 1), ("l1", 2), ("inf", 0), ("L2", 1), (" l1 ", 2), ("l_inf", 0),
             (math.inf, 0), (2, 1), (1, 2), (2.0, 1), (np.int64(1), 2)],
    "eps": [(0, 0.0), (0.0, 0.0), (1e-6, 1e-6), (0.05, 0.05), (0.3, 0.3), (1, 1.0), (2.0, 2.0), (10, 10.0),
            (1e4, 1e4), (1e30, 1e30), (1e300, 1e300), (math.inf, math.inf), (2**70, float(2**70)),
            (10**400, math.inf), (np.float32(0.25), 0.25), ("tensor", 0.5)],
    "alpha": [(0, 0.0), (1e-3, 1e-3), (0.1, 0.1), (1, 1.0), (1e3, 1e3), (1e6, 1e6), (1e15, 1e15),
              (np.float64(0.2), 0.2), ("tensor", 0.05)],
    "k": [(1, 1), (2, 2), (3, 3), (20, 20), (10**6, 10**6), (2**70, 2**63 - 1), (np.int64(4), 4)],
}
BAD = {
    "norm": ["l3", "", 3, 0, None, True, math.nan, "linf2"],
    "eps": [-1, -1e-9, math.nan, -math.inf, "0.3", None, True, 1j, -(10**400)],
    "alpha": [-0.1, math.inf, math.nan, 10**400, True, "0.1", None, 1e200],
    "k": [0, -1, 2.0, True, "3", None, 1.5],
}
BIG_ALPHA = 1e100  # valid only when the computation is float64 (above sqrt of float32's max)
GOOD_BOXES = [((0, 1), (0.0, 1.0)), ((-1, 1), (-1.0, 1.0)), ((0.5, 0.5), (0.5, 0.5)), ([-3.0, 2.0], (-3.0, 2.0)),
              ((np.float32(0), 1), (0.0, 1.0))]
BAD_BOXES = [(1, 0), (0, math.nan), (0, math.inf), "ab", (0, 1, 2), 5, None, (torch.tensor([0.0, 1.0]), 1),
             (10**400, 1)]
BAD_PROJECTIONS = ["Exact", "", None, 1, "l2"]
BAD_MEMBERS = [0, -2, True, 2.5, "3"]


def _norm_code(v) -> int:
    """docs/ops.md: 'linf'/'l2'/'l1' (any case, spaces and underscores ignored) or inf, 2, 1."""
    if isinstance(v, str):
        return {"linf": 0, "inf": 0, "l2": 1, "2": 1, "l1": 2, "1": 2}[v.strip().lower().replace("_", "")]
    return 0 if v == math.inf else {2: 1, 1: 2}[v]


def _param_value(raw):
    return torch.tensor(raw[1], dtype=torch.float64) if isinstance(raw, tuple) and raw[0] == "tensor" else raw


@st.composite
def _param(draw, name: str, members, fault_rate: float):
    """A scalar or (with members) per-member value of ``name``: ``(value, canonical per member
    or None, faults)``. Without members a sequence is itself a fault (it needs members=)."""
    m = members if isinstance(members, int) and not isinstance(members, bool) and members >= 1 else None
    as_seq = draw(st.sampled_from(["scalar", "scalar", "seq"])) if name in ("norm", "eps", "alpha", "k") else "scalar"
    length = m if m else draw(st.integers(1, 3))
    if as_seq == "seq":
        if _chance(draw, fault_rate / 2):
            length = draw(st.sampled_from([length + 1, max(1, length - 1)]))
        entries, canon, bad = [], [], False
        for _ in range(length):
            if _chance(draw, fault_rate / 3):
                entries.append(draw(st.sampled_from(BAD[name])))
                bad = True
            else:
                v, c = draw(st.sampled_from(GOOD[name]))
                if isinstance(v, str) and v == "tensor":
                    v = c
                entries.append(v)
                canon.append(_norm_code(v) if name == "norm" else c)
        container = draw(st.sampled_from(["list", "tuple", "tensor"]))
        if container == "tensor":
            if name == "norm" or bad or any(isinstance(e, (str, bool, complex)) or e is None for e in entries):
                container = "list"
            elif name == "k":
                if any(e >= 2**63 for e in entries):
                    container = "list"
            elif any(isinstance(e, int) and abs(e) > 1e300 for e in entries):
                container = "list"
        value = (torch.tensor([float(e) for e in entries], dtype=torch.float64) if container == "tensor" and name != "k"
                 else torch.tensor([int(e) for e in entries]) if container == "tensor"
                 else tuple(entries) if container == "tuple" else list(entries))
        faults = set()
        if bad:
            faults.add(name)
        if m is None or length != m:
            faults |= {name, "members"}
        return value, (canon if not faults else None), faults
    if _chance(draw, fault_rate):
        return draw(st.sampled_from(BAD[name])), None, {name}
    v, c = draw(st.sampled_from(GOOD[name]))
    if isinstance(v, str) and v == "tensor":
        v = torch.tensor(c, dtype=torch.float64)
    c = _norm_code(v) if name == "norm" else c
    return v, [c] * (m or 1), set()


@st.composite
def op_cases(draw):
    """One call of an lp op, as a plain dict (see :func:`_build_op`)."""
    fr = draw(st.sampled_from([0.0, 0.0, 0.1, 0.3]))  # how often an argument is invalid
    op = draw(st.sampled_from(sorted(OPS)))
    members = None
    if draw(st.booleans()):
        members = draw(st.sampled_from(BAD_MEMBERS)) if _chance(draw, fr) else draw(st.integers(1, 3))
    case = dict(op=op, members=members, faults=set())
    m = members if isinstance(members, int) and not isinstance(members, bool) and members >= 1 else None
    if members is not None and m is None:
        case["faults"].add("members")
    canon = {}
    for name in PARAMS[op]:
        value, c, faults = draw(_param(name, members, fr))
        case[name] = value
        canon[name] = c
        case["faults"] |= faults
    if op == "lp_step" and "alpha" not in case["faults"] and _chance(draw, 0.1):
        case["alpha"], canon["alpha"] = BIG_ALPHA, [BIG_ALPHA] * (m or 1)
        case["big_alpha"] = True
    case["canon"] = canon
    if _chance(draw, fr):
        case["box"], case["lohi"] = draw(st.sampled_from(BAD_BOXES)), None
        case["faults"].add("box")
    else:
        case["box"], case["lohi"] = draw(st.sampled_from(GOOD_BOXES))
    if op != "steepest_direction":
        if _chance(draw, fr):
            case["projection"] = draw(st.sampled_from(BAD_PROJECTIONS))
            case["faults"].add("projection")
        else:
            case["projection"] = draw(st.sampled_from(["exact", "sequential"]))
    # shapes: [B, ...] or [B, M, ...]
    b = _dim(draw, 4)
    rest = tuple(_dim(draw, 5, 0.05) for _ in range(draw(st.integers(0, 3))))
    shape = (b, m, *rest) if m else (b, *rest)
    names = TENSORS[op]
    shape_fault = draw(st.sampled_from(["none"] * 6 + ["zero_dim", "member_dim", "mismatch"]))
    if shape_fault == "zero_dim" and _chance(draw, fr * 3):
        shape = ()
        case["faults"].add(names[0])
    elif shape_fault == "member_dim" and m and _chance(draw, fr * 3):
        shape = (b, m + 1, *rest) if draw(st.booleans()) else (b,)
        case["faults"] |= {names[0], "members"}
    case["shape"] = shape
    case["dtype"] = draw(st.sampled_from(PREFERRED_FLOATS))
    case["device"] = "meta" if _chance(draw, 0.1) else "cpu"
    case["layouts"] = {t: draw(st.sampled_from(LAYOUTS)) for t in names}
    case["seed"] = draw(st.integers(0, 2**31 - 1))
    case["x_mode"] = draw(st.sampled_from(["inside", "bounds", "outside"]))
    case["delta_scale"] = draw(st.sampled_from([0.0, 1e-3, 0.3, 3.0, 1e4]))
    case["grad_scale"] = draw(st.sampled_from([1e-20, 1e-3, 1.0, 1e4]))
    case["grad_zeros"] = draw(st.sampled_from(["none", "some", "all"]))
    case["ties"] = draw(st.booleans())
    case["requires_grad"] = _chance(draw, 0.2)
    case["no_delta"] = op == "steepest_direction" and _chance(draw, 0.3)
    # one tensor made invalid, or poisoned with a non-finite value
    case["tensor_faults"] = {}
    if _chance(draw, fr * 2):
        who = draw(st.sampled_from([t for t in names if not (t == "delta" and case["no_delta"])]))
        kind = draw(st.sampled_from(["nan", "inf", "-inf", "int", "dtype", "shape", "meta", "list"]))
        if kind == "shape" and who == names[0]:
            kind = "nan"
        case["tensor_faults"][who] = kind
        if kind == "shape":
            case["mismatch_shape"] = draw(st.sampled_from([(1,), shape + (1,), (max(b, 1) + 1, *shape[1:])]))
        if kind == "dtype":
            case["other_dtype"] = draw(st.sampled_from(sorted(set(DTYPES) - {case["dtype"]})))
    return case


def _build_op(case):
    """``(fn, inputs, faults, check)`` for an op case."""
    op, shape, dtype, device = case["op"], tuple(case["shape"]), case["dtype"], case["device"]
    gen = torch.Generator().manual_seed(case["seed"])
    faults = set(case["faults"])
    lohi = case.get("lohi") or (0.0, 1.0)
    lo, hi = lohi
    base_shape = (1, *shape[1:]) if shape and shape[0] > 0 else shape

    def values(name):
        lay = case["layouts"].get(name, "contiguous")
        s = base_shape if lay == "expanded" and len(shape) >= 1 else shape
        if name == "x":
            t = lo + (hi - lo) * torch.rand(s, generator=gen, dtype=torch.float64)
            if case["x_mode"] == "bounds":
                t = torch.where(torch.rand(s, generator=gen) < 0.3, torch.full_like(t, hi), t)
                t = torch.where(torch.rand(s, generator=gen) < 0.3, torch.full_like(t, lo), t)
            elif case["x_mode"] == "outside":
                t = t + torch.randn(s, generator=gen, dtype=torch.float64)
        elif name == "delta":
            t = torch.randn(s, generator=gen, dtype=torch.float64) * case["delta_scale"]
        else:
            t = torch.randn(s, generator=gen, dtype=torch.float64) * case["grad_scale"]
            if case["ties"]:
                t = (t / case["grad_scale"]).round(decimals=1) * case["grad_scale"]
            if case["grad_zeros"] == "all":
                t = torch.zeros_like(t)
            elif case["grad_zeros"] == "some":
                t = torch.where(torch.rand(s, generator=gen) < 0.3, torch.zeros_like(t), t)
        kind = case["tensor_faults"].get(name)
        if kind in ("nan", "inf", "-inf"):
            if t.numel() and device != "meta":
                t = _poison(t, kind, gen)
                faults.add(name)
        if kind == "shape":
            t = torch.rand(case["mismatch_shape"], generator=gen, dtype=torch.float64)
            lay = "contiguous"
            faults.add(name)
        dt = dtype
        if kind == "int":
            dt = "int64"
            faults.add(name)
        elif kind == "dtype":
            dt = case["other_dtype"]
            faults.add(name)
        if len(t.shape) >= 1 and lay == "expanded" and t.shape != shape and kind != "shape":
            t = t.expand(shape)
        dev = device
        if kind == "meta":
            dev = "cpu" if device == "meta" else "meta"
            faults.add(name)
        out = _finish(t, dt, dev, lay if lay != "expanded" else "contiguous")
        if case["requires_grad"] and out.is_floating_point() and dev == "cpu":
            out = out.detach().requires_grad_() if out.is_contiguous() else out
        if kind == "list":
            faults.add(name)
            return t.tolist() if t.dim() else float(t)
        return out

    tensors = {}
    for name in TENSORS[op]:
        if name == "delta" and case["no_delta"]:
            tensors[name] = None
            continue
        tensors[name] = values(name)
    kwargs = {p: _param_value(case[p]) for p in PARAMS[op]}
    kwargs["box"] = case["box"]
    if op != "steepest_direction":
        kwargs["projection"] = case["projection"]
    if case["members"] is not None:
        kwargs["members"] = case["members"]
    if case.get("big_alpha") and dtype != "float64":
        faults.add("alpha")  # beyond float32's sqrt(max): documented limit of the computation
    # a dtype mismatch is with the first tensor's dtype; if every tensor ends up of one dtype no fault
    args = [tensors[n] for n in TENSORS[op]]
    fn = OPS[op]
    if op == "steepest_direction":
        call = lambda: fn(args[0], args[1], args[2], **kwargs)  # noqa: E731
    else:
        call = lambda: fn(*args, **kwargs)  # noqa: E731
    inputs = {**{n: tensors[n] for n in TENSORS[op]}, **kwargs, "op": op, "seed": case["seed"]}
    return call, inputs, faults, tensors, kwargs


def _row_norm(z: torch.Tensor, code: int) -> torch.Tensor:
    if z.shape[1] == 0:
        return torch.zeros(z.shape[0], dtype=z.dtype)
    return {0: lambda: z.abs().amax(1), 1: lambda: z.norm(dim=1), 2: lambda: z.abs().sum(1)}[code]()


def _check_op(case, out, tensors, inputs):
    op, shape = case["op"], tuple(case["shape"])
    ref_t = tensors["grad"] if op == "steepest_direction" else tensors["delta"]
    _check(isinstance(out, torch.Tensor), "not a tensor", inputs)
    _check(tuple(out.shape) == shape, f"shape {tuple(out.shape)}, want {shape}", inputs)
    _check(out.dtype == ref_t.dtype, f"dtype {out.dtype}, want {ref_t.dtype}", inputs)
    _check(out.device == ref_t.device, f"device {out.device}, want {ref_t.device}", inputs)
    _check(not out.requires_grad, "the result carries autograd history", inputs)
    if out.device.type == "meta" or out.numel() == 0:
        return
    members = case["members"]
    rows = shape[0] * (shape[1] if members else 1)
    n = out.numel() // rows
    canon = case["canon"]
    m = members or 1
    norms = canon["norm"]
    eps = canon.get("eps") or [0.0] * m
    alpha = canon.get("alpha") or [0.0] * m
    k = canon.get("k") or [1] * m
    lo, hi = case["lohi"]
    mode = MODES[op]
    exact = case.get("projection", "exact") == "exact"
    dtype = ref_t.dtype
    # Reference: float64 for float64 inputs; for the others the reference at their own
    # computation dtype (float32), which is the contract (docs/ops.md, "Dtypes").
    d = tensors["delta"] if tensors.get("delta") is not None else torch.zeros_like(tensors["x"])
    g = tensors.get("grad") if tensors.get("grad") is not None else d
    rows_of = lambda t: t.detach().reshape(rows, n)  # noqa: E731
    want, flags = ref_lp.lp_rows(mode, rows_of(d), rows_of(g), rows_of(tensors["x"]), norms, eps, alpha, k,
                                 lo, hi, exact)
    _check(int(flags.item()) == 0, "finite inputs flagged by the reference", inputs)
    got = out.detach().reshape(rows, n)
    rtol, atol = TOLERANCES[dtype]
    # Errors scale with the largest value the computation holds: x, the box, delta, and for a
    # step alpha (a float32 projection of |y| ~ 1e4 onto a ball of 10 is good to ~1e4 * 6e-8).
    span = 1.0 + max(abs(lo), abs(hi)) + float(tensors["x"].detach().double().abs().max())
    if mode != ref_lp.DIRECTION:
        span += float(d.detach().double().abs().max()) + (max(alpha) if mode == ref_lp.STEP else 0.0)
    huge = max(alpha) > 1e15  # the reference's bisection resolves t to 2^-100 only
    if not huge:
        _close(got, want, rtol, atol * span, f"{op} against the reference", inputs)
        event(f"{op}: checked against the reference ({'float64' if dtype == torch.float64 else 'float32'})")
    # the promises themselves, row by row (member r % M)
    x = rows_of(tensors["x"]).double()
    gd = got.double()
    for j in range(m):
        sel = slice(j, None, m)
        code = norms[j]
        z = gd[sel]
        tol = atol * span * max(1, n)
        if mode == ref_lp.DIRECTION:
            size = _row_norm(z, code)
            if code == 0:
                _check(bool(((z == 0) | (z.abs() == 1)).all()), "linf direction not in {-1, 0, 1}", inputs)
            elif code == 1:
                _check(bool((size <= 1 + tol).all()), f"l2 direction longer than 1: {size.max().item()}", inputs)
            else:
                _check(bool(((size - 1).abs() <= tol).logical_or(size == 0).all()),
                       f"l1 direction's mass is not 0 or 1: {size.tolist()}", inputs)
            continue
        a, bnd = (lo - x[sel]).clamp(max=0), (hi - x[sel]).clamp(min=0)
        scale = span + a.abs().max().item() + bnd.max().item()
        _check(bool((z >= a - atol * scale).all() and (z <= bnd + atol * scale).all()),
               f"member {j}: x + result leaves the box", inputs)
        if eps[j] < math.inf:
            size = _row_norm(z, code)
            _check(bool((size <= eps[j] * (1 + rtol) + atol * scale * max(1, n)).all()),
                   f"member {j}: result outside the {['linf', 'l2', 'l1'][code]} ball of radius {eps[j]}: "
                   f"{size.max().item()}", inputs)


@_fuzz(2000)
@given(case=op_cases())
# A float32 l1 step with alpha past float32's range hung the C++ root search (NaN in the
# bracket): now a ValueError naming alpha.
@example(case=dict(op="lp_step", members=None, faults={"alpha"}, norm="l1", eps=1e308, alpha=1e308, k=20,
                   canon={}, box=(0, 1), lohi=(0.0, 1.0), projection="exact", shape=(3, 5), dtype="float32",
                   device="cpu", layouts={}, seed=0, x_mode="inside", delta_scale=0.3, grad_scale=1.0,
                   grad_zeros="none", ties=False, requires_grad=False, no_delta=False, tensor_faults={}))
# A float32 l2 step with alpha 1e30 gave NaN (C++: alpha / ||g|| overflowed) or 0 (the reference:
# y^2 overflowed): alpha is limited to sqrt(float32 max).
@example(case=dict(op="lp_step", members=None, faults={"alpha"}, norm="l2", eps=0.3, alpha=1e30, k=20,
                   canon={}, box=(0, 1), lohi=(0.0, 1.0), projection="exact", shape=(2, 4), dtype="float32",
                   device="cpu", layouts={}, seed=1, x_mode="inside", delta_scale=0.0, grad_scale=1e-20,
                   grad_zeros="some", ties=False, requires_grad=False, no_delta=False, tensor_faults={}))
# k past int64 leaked the custom op's schema error (RuntimeError, "Declaration: pyens_C::lp_rows").
@example(case=dict(op="steepest_direction", members=2, faults=set(), norm="l1", k=[2**70, 3],
                   canon={"norm": [2, 2], "k": [2**63 - 1, 3]}, box=(0, 1), lohi=(0.0, 1.0), shape=(2, 2, 3),
                   dtype="float64", device="cpu", layouts={}, seed=2, x_mode="bounds", delta_scale=0.3,
                   grad_scale=1.0, grad_zeros="some", ties=True, requires_grad=False, no_delta=True,
                   tensor_faults={}))
# meta tensors raised NotImplementedError (torch.nonzero has no meta kernel); now the shape only.
@example(case=dict(op="lp_project", members=None, faults=set(), norm="l2", eps=0.5, canon={"norm": [1], "eps": [0.5]},
                   box=(0, 1), lohi=(0.0, 1.0), projection="exact", shape=(3, 4), dtype="float32", device="meta",
                   layouts={}, seed=3, x_mode="inside", delta_scale=0.3, grad_scale=1.0, grad_zeros="none",
                   ties=False, requires_grad=False, no_delta=False, tensor_faults={}))
# A huge int eps raised OverflowError; a box of strings raised a ValueError naming nothing.
@example(case=dict(op="lp_project", members=None, faults=set(), norm="linf", eps=10**400,
                   canon={"norm": [0], "eps": [math.inf]}, box=(0, 1), lohi=(0.0, 1.0), projection="sequential",
                   shape=(2, 3), dtype="float64", device="cpu", layouts={}, seed=4, x_mode="outside",
                   delta_scale=3.0, grad_scale=1.0, grad_zeros="none", ties=False, requires_grad=False,
                   no_delta=False, tensor_faults={}))
@example(case=dict(op="lp_project", members=None, faults={"box"}, norm="linf", eps=0.1, canon={}, box="ab",
                   lohi=None, projection="exact", shape=(2, 3), dtype="float32", device="cpu", layouts={}, seed=5,
                   x_mode="inside", delta_scale=0.3, grad_scale=1.0, grad_zeros="none", ties=False,
                   requires_grad=False, no_delta=False, tensor_faults={}))
def test_fuzz_lp_ops(case):
    event(f"{case['op']} on {case['device']}")
    call, inputs, faults, tensors, _ = _build_op(case)
    before = _snapshot(tensors)
    out = _call(call, inputs, faults)
    if out is not None:
        _check_op(case, out, tensors, inputs)
        _unchanged(before, tensors, inputs)


def test_member_parameters_are_not_served_stale():
    """Regression: the parsed-parameter cache took a tensor of radii by identity (a changed
    tensor kept its old radii) and 1, 1.0 and True for one key (k=1.0 passed after k=1)."""
    x = torch.full((1, 2, 4), 0.5, dtype=torch.float64)
    d = torch.full_like(x, 0.4)
    eps = torch.tensor([0.1, 0.2], dtype=torch.float64)
    assert lp_project(d, x, norm="linf", eps=eps, members=2).amax(-1).tolist() == [[0.1, 0.2]]
    eps[0] = 0.3
    assert lp_project(d, x, norm="linf", eps=eps, members=2).amax(-1).tolist() == [[0.3, 0.2]]
    steepest_direction(d[:, 0], x[:, 0], norm="l1", k=1)
    _call(lambda: steepest_direction(d[:, 0], x[:, 0], norm="l1", k=1.0), {"k": 1.0}, {"k"})
    lp_project(d, x, norm="l1", eps=1)
    _call(lambda: lp_project(d, x, norm="l1", eps=True), {"eps": True}, {"eps"})


# ---------------------------------------------------------------------------------------------
# mahalanobis

FORMS = ("diag", "tril", "full")


@st.composite
def maha_cases(draw):
    fr = draw(st.sampled_from([0.0, 0.0, 0.15]))
    case = dict(faults=set())
    case["E"], case["C"], case["N"], case["B"] = _dim(draw, 3), _dim(draw, 4), _dim(draw, 5), _dim(draw, 4)
    case["form"] = draw(st.sampled_from(FORMS))
    case["form_arg"] = case["form"]
    if _chance(draw, fr):
        case["form_arg"] = draw(st.sampled_from(["TRIL", "", None, 1, "lower"]))
        case["faults"].add("form")
    case["shared_x"] = draw(st.booleans())
    case["eps"] = draw(st.sampled_from([0.0, 1e-12, 1e-3, 1.0, 1e300, 2**70]))
    if _chance(draw, fr):
        case["eps"] = draw(st.sampled_from([-1.0, math.nan, math.inf, "1e-12", None, True]))
        case["faults"].add("eps")
    case["dtype"] = draw(st.sampled_from(PREFERRED_FLOATS))
    case["device"] = "meta" if _chance(draw, 0.1) else "cpu"
    case["layouts"] = {t: draw(st.sampled_from(LAYOUTS)) for t in ("x", "P", "centers")}
    case["seed"] = draw(st.integers(0, 2**31 - 1))
    case["poison"] = {}
    if _chance(draw, 0.25):  # NaN / inf are valid here: they propagate (docs/ops.md)
        case["poison"][draw(st.sampled_from(["x", "P", "centers", "P_upper"]))] = draw(
            st.sampled_from(["nan", "inf", "-inf"]))
    case["tensor_faults"] = {}
    if _chance(draw, fr * 2):
        case["tensor_faults"][draw(st.sampled_from(["x", "P", "centers"]))] = draw(
            st.sampled_from(["int", "bool", "dtype", "shape", "meta", "list"]))
        case["other_dtype"] = draw(st.sampled_from(sorted(set(DTYPES) - {case["dtype"]})))
    case["grad"] = _chance(draw, 0.3)
    if case["grad"] and _chance(draw, 0.5):
        case["dtype"] = "float64"  # whose gradients are compared with the reference's autograd
    return case


def _build_maha(case):
    E, C, N, B, form = case["E"], case["C"], case["N"], case["B"], case["form"]
    gen = torch.Generator().manual_seed(case["seed"])
    faults = set(case["faults"])
    shapes = {"x": (B, N) if case["shared_x"] else (B, E, N), "P": (E, N) if form == "diag" else (E, N, N),
              "centers": (E, C, N)}
    tensors = {}
    for name, shape in shapes.items():
        kind = case["tensor_faults"].get(name)
        lay = case["layouts"][name]
        if kind == "shape":
            shape = {"x": (B, N + 1), "P": (E, N + 1) if form == "diag" else (E + 1, N, N), "centers": (E, C)}[name]
            faults.add(name)
        s = (1, *shape[1:]) if lay == "expanded" and shape and shape[0] > 0 else shape
        t = torch.randn(s, generator=gen, dtype=torch.float64)
        p = case["poison"].get(name)
        if p and t.numel() and case["device"] != "meta":
            t = _poison(t, p, gen)
        if name == "P" and "P_upper" in case["poison"] and form == "tril" and N >= 2 and E:
            t = t.clone()
            t[..., 0, N - 1] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[case["poison"]["P_upper"]]
        if lay == "expanded" and t.shape != shape:
            t = t.expand(shape)
        dt, dev = case["dtype"], case["device"]
        if kind in ("int", "bool"):
            dt = "int64" if kind == "int" else "bool"
            faults.add(name)
        elif kind == "dtype":
            dt = case["other_dtype"]
            if dt != case["dtype"]:
                faults.add(name)
        elif kind == "meta":
            dev = "cpu" if dev == "meta" else "meta"
            faults.add(name)
        out = _finish(t, dt, dev, "contiguous" if lay == "expanded" else lay)
        if kind == "list":
            faults.add(name)
            out = t.tolist()
        tensors[name] = out
    if case["grad"] and not faults and case["device"] == "cpu":
        tensors = {k: v.detach().clone(memory_format=torch.preserve_format).requires_grad_()
                   for k, v in tensors.items()}
    kwargs = dict(form=case["form_arg"], eps=case["eps"])
    call = lambda: mahalanobis(tensors["x"], tensors["P"], tensors["centers"], **kwargs)  # noqa: E731
    inputs = {**tensors, **kwargs, "seed": case["seed"]}
    return call, inputs, faults, tensors


@_fuzz(1000)
@given(case=maha_cases())
# A huge int eps raised OverflowError (float(10**400)); it is now rejected by name like inf.
@example(case=dict(faults={"eps"}, E=2, C=3, N=4, B=2, form="diag", form_arg="diag", shared_x=True, eps=10**400,
                   dtype="float32", device="cpu", layouts={"x": "contiguous", "P": "contiguous",
                                                           "centers": "contiguous"},
                   seed=0, poison={}, tensor_faults={}, grad=False))
def test_fuzz_mahalanobis(case):
    call, inputs, faults, tensors = _build_maha(case)
    before = _snapshot(tensors)
    out = _call(call, inputs, faults)
    if out is None:
        return
    x, P, centers = tensors["x"], tensors["P"], tensors["centers"]
    want_shape = (x.shape[0], centers.shape[0], centers.shape[1])
    _check(tuple(out.shape) == want_shape, f"shape {tuple(out.shape)}, want {want_shape}", inputs)
    _check(out.dtype == x.dtype and out.device == x.device, f"dtype/device {out.dtype} {out.device}", inputs)
    if out.device.type == "meta":
        return
    _unchanged(before, tensors, inputs)
    code = ref_maha.FORMS[case["form"]]
    eps = float(case["eps"])
    want = ref_maha.mahalanobis(x.detach().double(), P.detach().double(), centers.detach().double(), form=code,
                                eps=eps)
    rtol, atol = TOLERANCES[x.dtype]
    _close(out, want.to(x.dtype), rtol * 4, atol * 4, "mahalanobis against the float64 reference", inputs,
           nonfinite_alike=True)
    event("mahalanobis: checked against the reference")
    if case["poison"].get("P_upper") and case["form"] == "tril" and bool(torch.isfinite(want.to(x.dtype)).all()):
        _check(bool(torch.isfinite(out).all()), "a NaN in tril's unread upper triangle leaked", inputs)
    if case["grad"] and out.requires_grad and out.numel() and bool(torch.isfinite(out).all()):
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        got = torch.autograd.grad((out.double() * w).sum(), [x, P, centers], allow_unused=True)
        leaves = [t.detach().double().requires_grad_() for t in (x, P, centers)]
        r = ref_maha.mahalanobis(*leaves, form=code, eps=eps)
        ref = torch.autograd.grad((r * w).sum(), leaves, allow_unused=True)
        for name, gt, rt in zip(("dx", "dP", "dcenters"), got, ref):
            gt = torch.zeros_like(rt) if gt is None else gt
            rt = torch.zeros_like(gt, dtype=torch.float64) if rt is None else rt
            _check(tuple(gt.shape) == tuple(rt.shape), f"{name} shape {tuple(gt.shape)}", inputs)
            _event("mahalanobis: gradient shapes checked")
            if x.dtype == torch.float64 and eps > 0 and bool(torch.isfinite(rt).all()):
                scale = 1 + float(rt.abs().max()) if rt.numel() else 1
                _close(gt, rt, 1e-6, 1e-6 * scale, f"{name} against the reference's autograd", inputs)
                event("mahalanobis: gradients checked against the reference")


# ---------------------------------------------------------------------------------------------
# attacks

class _Linear(torch.nn.Module):
    """``[B, ...] -> [B, K]`` (or ``[B, M, ...] -> [B, M, K]`` with ``lead=2``): a fixed random
    map of the flattened input with a mild nonlinearity, computed in float64 for any input
    dtype, so that every drawn dtype reaches the attack rather than the model."""

    def __init__(self, k: int, lead: int = 1, seed: int = 0):
        super().__init__()
        self.k, self.lead, self.seed = k, lead, seed

    def forward(self, z):
        f = z.flatten(self.lead).double()
        gen = torch.Generator().manual_seed(self.seed)
        w = torch.randn(f.shape[-1], self.k, generator=gen, dtype=torch.float64)
        return f @ w + 0.5 * (f * f) @ w.flip(0) if f.shape[-1] else f.new_zeros(*f.shape[:-1], self.k)


ATTACK_NORMS = ("linf", "l2", "l1")


@st.composite
def attack_cases(draw):
    fr = draw(st.sampled_from([0.0, 0.0, 0.04, 0.12]))
    case = dict(faults=set())
    kind = draw(st.sampled_from(["PGD", "PGD", "MSD", "mimo_pgd", "mimo_msd"]))
    case["kind"] = kind
    mimo = kind.startswith("mimo")
    case["K"] = draw(st.integers(1, 4))
    case["B"] = _dim(draw, 3)
    case["M"] = draw(st.integers(1, 3)) if mimo else None
    case["feat"] = tuple(_dim(draw, 3, 0.05) for _ in range(draw(st.integers(1, 3))))
    # float64 half the time: those PGD runs are checked against the float64 reference loop
    case["dtype"] = "float64" if _chance(draw, 0.5) else draw(st.sampled_from(PREFERRED_FLOATS))
    case["layout"] = draw(st.sampled_from(LAYOUTS))
    case["seed"] = draw(st.integers(0, 2**31 - 1))
    case["box"], case["lohi"] = draw(st.sampled_from([((0, 1), (0.0, 1.0)), ((-1, 1), (-1.0, 1.0))]))
    case["steps"] = draw(st.integers(1, 3))
    case["projection"] = draw(st.sampled_from(["exact", "sequential"]))

    def real(name, good):
        if _chance(draw, fr):
            case["faults"].add(name)
            return draw(st.sampled_from([-0.1, math.nan, math.inf, 10**400, "0.1", True]))
        return draw(st.sampled_from(good))

    def count(name, good):
        if _chance(draw, fr):
            case["faults"].add(name)
            return draw(st.sampled_from([0, -1, 1.5, True, "2"]))
        return draw(st.sampled_from(good))

    eps_good = [0.0, 0.05, 0.3, 1.0, 4.0, 1e6, 1e30]
    alpha_good = [0.0, 0.01, 0.1, 1.0, 1e6]
    if kind in ("PGD", "mimo_pgd"):
        n = case["M"] or 1
        per = kind == "mimo_pgd" and draw(st.booleans())
        norms = [draw(st.sampled_from(ATTACK_NORMS)) for _ in range(n)] if per else draw(st.sampled_from(ATTACK_NORMS))
        if _chance(draw, fr):
            norms = draw(st.sampled_from(["l3", None, 2.5]))
            case["faults"].add("norms" if mimo else "norm")
        case["norms"] = norms
        case["eps"] = [real("eps", eps_good) for _ in range(n)] if per else real("eps", eps_good)
        case["alpha"] = real("alpha", alpha_good)
        case["k"] = count("k", [1, 3, 20, 2**70])
        case["random_start"] = _chance(draw, 0.35)
        if _chance(draw, fr):
            case["random_start"] = "no"
            case["faults"].add("random_start")
        if kind == "PGD":
            case["restarts"] = count("restarts", [1, 1, 1, 2])
            if case["restarts"] == 2 and case["random_start"] is False and not _chance(draw, fr):
                case["random_start"] = True
            case["loss"] = draw(st.sampled_from(["ce", "margin", "ce_callable"]))
            if _chance(draw, fr):
                case["loss"] = "mse"
                case["faults"].add("loss")
            if case["restarts"] == 2 and case["random_start"] is False:
                case["faults"] |= {"restarts", "random_start"}
        else:
            case["gradient"] = draw(st.sampled_from(["approx", "naive"]))
    else:
        norms = draw(st.lists(st.sampled_from(ATTACK_NORMS), min_size=1, max_size=3, unique=True))
        if _chance(draw, fr):
            norms = draw(st.sampled_from([[], "linf", ["l3"]]))
            case["faults"].add("norms")
        case["norms"] = norms
        n = len(norms) if isinstance(norms, list) and norms else 1
        case["eps"] = [real("eps", eps_good) for _ in range(n)] if draw(st.booleans()) else real("eps", eps_good)
        case["alpha"] = real("alpha", alpha_good)
        case["k"] = count("k", [1, 5, 20])
        case["select"] = draw(st.sampled_from(["example", "batch"]))
        case["score"] = draw(st.sampled_from(["auto", "stacked", "per_norm"]))
        case["k_range"] = draw(st.sampled_from([None, (), (1, 3)]))
        if _chance(draw, fr):
            case["k_range"] = draw(st.sampled_from([(3, 1), (0, 2), (1,), "ab"]))
            case["faults"].add("k_range")
        if kind == "mimo_msd":
            case["random_start"] = draw(st.booleans())
    # inputs
    case["x_fault"] = None
    if _chance(draw, fr * 2):
        case["x_fault"] = draw(st.sampled_from(["nan", "outside", "int", "bool", "meta", "no_features"]))
        case["faults"].add("x")
    case["y_fault"] = None
    if _chance(draw, fr * 2):
        case["y_fault"] = draw(st.sampled_from(["negative", "too_big", "float", "bool", "shape", "meta"]))
        case["faults"].add("y")
    case["y_dtype"] = draw(st.sampled_from(["int64", "int32", "uint8"]))
    return case


def _build_attack(case):
    kind, K, B, M = case["kind"], case["K"], case["B"], case["M"]
    gen = torch.Generator().manual_seed(case["seed"])
    faults = set(case["faults"])
    lo, hi = case["lohi"]
    lead = (B, M) if M else (B,)
    shape = (*lead, *case["feat"])
    xf = case["x_fault"]
    if xf == "no_features":
        shape = lead
    s = (1, *shape[1:]) if case["layout"] == "expanded" and B > 0 else shape
    x = lo + (hi - lo) * torch.rand(s, generator=gen, dtype=torch.float64)
    if xf == "nan" and x.numel():
        x = _poison(x, "nan", gen)
    if xf == "outside" and x.numel():
        x = x.clone()
        x.view(-1)[0] = hi + 1
    if x.shape != shape:
        x = x.expand(shape)
    dt = {"int": "int64", "bool": "bool"}.get(xf, case["dtype"])
    x = _finish(x, dt, "meta" if xf == "meta" else "cpu", "contiguous" if case["layout"] == "expanded" else case["layout"])
    if xf in ("nan", "outside") and x.numel() == 0:
        faults.discard("x")
    y = torch.randint(0, K, lead, generator=gen)
    yf = case["y_fault"]
    if yf is None:
        y = y.to(DTYPES[case["y_dtype"]])
    elif yf in ("negative", "too_big"):
        if y.numel():
            y = y.clone()
            y.view(-1)[0] = -1 - K if yf == "negative" else K
        else:
            faults.discard("y")  # no label to be wrong
    elif yf == "float":
        y = y.double()
    elif yf == "bool":
        y = y > 0
    elif yf == "shape":
        y = y[..., :0] if M else y.unsqueeze(-1)
    elif yf == "meta":
        y = y.to("meta")
    model = _Linear(K, lead=2 if M else 1, seed=case["seed"] % 1000)
    common = dict(steps=case["steps"], projection=case["projection"], box=case["box"])
    if kind == "PGD":
        loss = case["loss"]
        if loss == "ce_callable":
            loss = lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="none")  # noqa: E731
        kw = dict(norm=case["norms"], eps=case["eps"], alpha=case["alpha"], k=case["k"],
                  random_start=case["random_start"], restarts=case["restarts"], loss=loss, **common)
        call = lambda: PGD(model, **kw)(x, y)  # noqa: E731
    elif kind == "MSD":
        kw = dict(norms=case["norms"], eps=case["eps"], alpha=case["alpha"], k=case["k"], select=case["select"],
                  score=case["score"], k_range=case["k_range"], **common)
        call = lambda: MSD(model, **kw)(x, y)  # noqa: E731
    elif kind == "mimo_pgd":
        kw = dict(norms=case["norms"], eps=case["eps"], alpha=case["alpha"], k=case["k"],
                  random_start=case["random_start"], gradient=case["gradient"], **common)
        call = lambda: mimo_pgd(model, x, y, **kw)  # noqa: E731
    else:
        kw = dict(norms=case["norms"], eps=case["eps"], alpha=case["alpha"], k=case["k"], select=case["select"],
                  score=case["score"], k_range=case["k_range"], random_start=case["random_start"], **common)
        call = lambda: mimo_msd(model, x, y, **kw)  # noqa: E731
    # alpha beyond the computation's limit (sqrt of float32's max) only fails at the first step
    big = [a for a in (case["alpha"] if isinstance(case["alpha"], list) else [case["alpha"]])
           if isinstance(a, float) and math.isfinite(a) and a > 1.8e19]
    if big and x.dtype != torch.float64:
        faults.add("alpha")
    inputs = {"attack": kind, **kw, "x": x, "y": y, "K": K, "seed": case["seed"]}
    return call, inputs, faults, x, y, model, kw


def _lp(d: torch.Tensor, norm: str) -> torch.Tensor:
    d = d.flatten(1).double()
    if d.shape[1] == 0:
        return torch.zeros(d.shape[0], dtype=torch.float64)
    return {"linf": d.abs().amax(1), "l2": d.norm(dim=1), "l1": d.abs().sum(1)}[norm]


def _pgd_reference(model, x, y, norm, eps, alpha, k, steps, box, projection, loss):
    """PGD from delta = 0 in float64 with the reference step (restarts=1, no random start)."""
    x64 = x.double()
    delta = torch.zeros_like(x64)
    rows, n = x64.shape[0], x64[0].numel()
    code = {"linf": 0, "l2": 1, "l1": 2}[norm]
    kk = min(int(k), 2**63 - 1)
    for _ in range(steps):
        d = delta.clone().requires_grad_()
        z = model(x64 + d)
        if loss == "margin":
            true = z.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
            others = z.masked_fill(torch.nn.functional.one_hot(y.long(), z.shape[-1]).bool(), -math.inf)
            per = others.amax(-1) - true
        else:
            per = torch.nn.functional.cross_entropy(z, y.long(), reduction="none")
        g = torch.autograd.grad(per.sum(), d)[0] if per.requires_grad else torch.zeros_like(d)
        out, _ = ref_lp.lp_rows(ref_lp.STEP, delta.reshape(rows, n), g.reshape(rows, n), x64.reshape(rows, n),
                                [code], [eps], [alpha], [kk], box[0], box[1], projection == "exact")
        delta = out.reshape(x64.shape)
    return (x64 + delta).clamp(*box)


@_fuzz(500)
@given(case=attack_cases())
# An attack on meta tensors raised RuntimeError (Tensor.item() on a meta tensor); a huge int
# eps raised OverflowError: both are now ValueErrors naming the argument.
@example(case=dict(faults={"x"}, kind="PGD", K=3, B=2, M=None, feat=(4,), dtype="float32", layout="contiguous",
                   seed=0, box=(0, 1), lohi=(0.0, 1.0), steps=1, projection="exact", norms="l2", eps=0.5,
                   alpha=0.1, k=20, random_start=False, restarts=1, loss="ce", x_fault="meta", y_fault=None,
                   y_dtype="int64"))
@example(case=dict(faults={"eps"}, kind="PGD", K=3, B=2, M=None, feat=(4,), dtype="float32", layout="contiguous",
                   seed=0, box=(0, 1), lohi=(0.0, 1.0), steps=1, projection="exact", norms="l2", eps=10**400,
                   alpha=0.1, k=20, random_start=False, restarts=1, loss="ce", x_fault=None, y_fault=None,
                   y_dtype="int64"))
# mimo_msd with alpha 1e300 on float32 inputs hung in the C++ l1 step.
@example(case=dict(faults=set(), kind="mimo_msd", K=3, B=2, M=3, feat=(2, 3), dtype="float32", layout="contiguous",
                   seed=0, box=(0, 1), lohi=(0.0, 1.0), steps=2, projection="exact", norms=["linf", "l2", "l1"],
                   eps=[1e30, 1e30, 1e30], alpha=1e300, k=20, select="example", score="auto", k_range=None,
                   random_start=True, x_fault=None, y_fault=None, y_dtype="int64"))
def test_fuzz_attacks(case):
    event(case["kind"])
    call, inputs, faults, x, y, model, kw = _build_attack(case)
    before = _snapshot({"x": x, "y": y})
    torch.manual_seed(case["seed"])
    out = _call(call, inputs, faults)
    if out is None:
        return
    _unchanged(before, {"x": x, "y": y}, inputs)
    _check(isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype,
           f"x_adv {_describe(out)} does not match x", inputs)
    _check(not out.requires_grad, "x_adv carries autograd history", inputs)
    lo, hi = case["lohi"]
    _check(bool((out >= lo).all() and (out <= hi).all()), "x_adv leaves the box", inputs)
    if out.numel() == 0:
        return
    d = out.double() - x.double()
    # rounding of x + delta into x's dtype (one ulp of the box's magnitude per coordinate), and
    # of the step computed in float32 for all but float64: ~ulp(alpha) (see _check_op)
    alphas = kw["alpha"] if isinstance(kw["alpha"], list) else [kw["alpha"]]
    comp = torch.float64 if x.dtype == torch.float64 else torch.float32
    ulp = (torch.finfo(x.dtype).eps * max(abs(lo), abs(hi), 1.0)
           + torch.finfo(comp).eps * (max(alphas) + 2 * max(abs(lo), abs(hi), 1.0)))
    n = x[0, 0].numel() if case["M"] else x[0].numel()

    def within(dd, norm, eps):
        tol = {"linf": 2 * ulp, "l2": 2 * ulp * math.sqrt(n), "l1": 2 * ulp * n}[norm]
        return _lp(dd, norm) <= eps * (1 + 1e-6) + tol

    kind = case["kind"]
    if kind == "PGD":
        _check(bool(within(d, kw["norm"], kw["eps"]).all()), "PGD: x_adv outside the eps ball", inputs)
        if (x.dtype == torch.float64 and kw["restarts"] == 1 and not kw["random_start"]
                and isinstance(kw["loss"], str) and kw["alpha"] <= 1e6):
            want = _pgd_reference(model, x, y, kw["norm"], kw["eps"], kw["alpha"], kw["k"], kw["steps"],
                                  case["lohi"], kw["projection"], kw["loss"])
            _close(out, want, 1e-7, 1e-7 * (1 + kw["eps"] if kw["eps"] < 1e6 else 1),
                   "PGD against the float64 reference loop", inputs)
            event("PGD: checked against the float64 reference loop")
    elif kind == "MSD":
        eps = kw["eps"] if isinstance(kw["eps"], list) else [kw["eps"]] * len(kw["norms"])
        inside = torch.stack([within(d, p, e) for p, e in zip(kw["norms"], eps)]).any(0)
        _check(bool(inside.all()), "MSD: x_adv outside the union of the balls", inputs)
    elif kind == "mimo_pgd":
        m = case["M"]
        norms = kw["norms"] if isinstance(kw["norms"], list) else [kw["norms"]] * m
        eps = kw["eps"] if isinstance(kw["eps"], list) else [kw["eps"]] * m
        for j in range(m):
            _check(bool(within(d[:, j], norms[j], eps[j]).all()), f"mimo_pgd: slot {j} outside its ball", inputs)
    else:
        eps = kw["eps"] if isinstance(kw["eps"], list) else [kw["eps"]] * len(kw["norms"])
        for j in range(case["M"]):
            inside = torch.stack([within(d[:, j], p, e) for p, e in zip(kw["norms"], eps)]).any(0)
            _check(bool(inside.all()), f"mimo_msd: slot {j} outside the union of the balls", inputs)


# ---------------------------------------------------------------------------------------------
# MIMO

def _pool_linear(cin: int, k: int) -> torch.nn.Module:
    torch.manual_seed(cin * 31 + k)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(cin, k))


@st.composite
def mimo_cases(draw):
    fr = draw(st.sampled_from([0.0, 0.0, 0.1]))
    case = dict(faults=set())

    def pos(name, hi):
        if _chance(draw, fr / 2):
            case["faults"].add(name)
            return draw(st.sampled_from([0, -1, 1.5, True, "2", None]))
        return draw(st.integers(1, hi))

    case["members"] = pos("members", 3)
    case["in_channels"] = pos("in_channels", 3)
    case["num_classes"] = pos("num_classes", 4)
    c = case["in_channels"] if isinstance(case["in_channels"], int) and not isinstance(case["in_channels"], bool) \
        and case["in_channels"] >= 1 else 1
    stats = draw(st.sampled_from(["default", "one", "per_channel"]))
    case["mean"], case["std"] = {"default": ((0.0,), (1.0,)), "one": ((0.5,), (0.25,)),
                                 "per_channel": (tuple(0.1 * i for i in range(c)), tuple(0.5 + 0.1 * i for i in range(c)))
                                 }[stats]
    if _chance(draw, fr / 2):
        case["mean"], case["std"], name = draw(st.sampled_from([
            ((math.nan,), (1.0,), "mean"), ((0.0,), (0.0,), "std"), ((0.0,), (-1.0,), "std"),
            ("a", (1.0,), "mean"), (None, (1.0,), "mean"), ((0.0, 0.0, 0.0, 0.0), (1.0,), "mean")]))
        case["faults"].add(name)
    case["double_module"] = _chance(draw, 0.2)
    case["call"] = draw(st.sampled_from(["forward", "forward", "ensemble", "member"]))
    case["B"], case["H"], case["W"] = _dim(draw, 3), _dim(draw, 4, 0.05), _dim(draw, 4, 0.05)
    case["dtype"] = draw(st.sampled_from(PREFERRED_DTYPES if _chance(draw, 0.4) else PREFERRED_FLOATS[:1]))
    case["layout"] = draw(st.sampled_from(LAYOUTS))
    case["device"] = "meta" if _chance(draw, 0.1) else "cpu"
    case["wrong_shape"] = _chance(draw, fr)
    case["index"] = draw(st.sampled_from([0, 1, 2, -1, 1.0, 5])) if case["call"] == "member" else 0
    case["average"] = draw(st.sampled_from(["prob", "logits", "mean"])) if case["call"] == "ensemble" else "prob"
    case["seed"] = draw(st.integers(0, 2**31 - 1))
    return case


def _mimo_reference(model: MIMO, x: torch.Tensor) -> torch.Tensor:
    """``[B, M, C, H, W] -> [B, M, K]`` in float64: normalise, average over H, W, slot-major
    channels, the linear head."""
    mean = model.normalize.mean.double().view(1, 1, -1)
    std = model.normalize.std.double().view(1, 1, -1)
    z = x.detach().double().mean((-1, -2))  # [B, M, C]
    z = ((z - mean) / std).flatten(1)
    lin = model.backbone[2]
    out = z @ lin.weight.double().t() + lin.bias.double()
    return out.view(x.shape[0], model.members, model.num_classes)


@_fuzz(400)
@given(case=mimo_cases())
# Integer images were read as pixel values 0..255 (silently); float64 inputs and meta tensors
# raised RuntimeError from inside the network.
@example(case=dict(faults=set(), members=2, in_channels=1, num_classes=3, mean=(0.0,), std=(1.0,),
                   double_module=False, call="forward", B=2, H=2, W=2, dtype="uint8", layout="contiguous",
                   device="cpu", wrong_shape=False, index=0, average="prob", seed=0))
@example(case=dict(faults=set(), members=2, in_channels=1, num_classes=3, mean=(0.0,), std=(1.0,),
                   double_module=False, call="forward", B=2, H=2, W=2, dtype="float64", layout="contiguous",
                   device="meta", wrong_shape=False, index=0, average="prob", seed=0))
@example(case=dict(faults={"mean"}, members=2, in_channels=1, num_classes=3, mean="a", std=(1.0,),
                   double_module=False, call="forward", B=2, H=2, W=2, dtype="float32", layout="contiguous",
                   device="cpu", wrong_shape=False, index=0, average="prob", seed=0))
def test_fuzz_mimo(case):
    faults = set(case["faults"])
    model = _call(lambda: MIMO(_pool_linear, members=case["members"], in_channels=case["in_channels"],
                               num_classes=case["num_classes"], mean=case["mean"], std=case["std"]),
                  {k: case[k] for k in ("members", "in_channels", "num_classes", "mean", "std")}, faults)
    if model is None:
        return
    if case["double_module"]:
        model = model.double()
    mdt = torch.float64 if case["double_module"] else torch.float32
    m, c = model.members, model.in_channels
    gen = torch.Generator().manual_seed(case["seed"])
    single = case["call"] != "forward"
    shape = (case["B"], c, case["H"], case["W"]) if single else (case["B"], m, c, case["H"], case["W"])
    if case["wrong_shape"]:
        shape = shape[:-1] if len(shape) > 3 else shape + (1,)
    s = (1, *shape[1:]) if case["layout"] == "expanded" and shape[0] > 0 else shape
    x = torch.rand(s, generator=gen, dtype=torch.float64)
    if x.shape != shape:
        x = x.expand(shape)
    x = _finish(x, case["dtype"], case["device"], "contiguous" if case["layout"] == "expanded" else case["layout"])
    calls = set()
    if case["wrong_shape"]:
        calls.add("x")
    if not x.is_floating_point() or torch.promote_types(x.dtype, mdt) != mdt or x.device.type == "meta":
        calls.add("x")
    if case["call"] == "member" and (not isinstance(case["index"], int) or not 0 <= case["index"] < m):
        calls.add("i")
    if case["call"] == "ensemble" and case["average"] not in ("prob", "logits"):
        calls.add("average")
    fn = {"forward": lambda: model(x), "ensemble": lambda: model.ensemble(x, average=case["average"]),
          "member": lambda: model.member(case["index"])(x)}[case["call"]]
    inputs = {"call": case["call"], "x": x, "model dtype": mdt, "members": m, "in_channels": c,
              "index": case["index"], "average": case["average"]}
    out = _call(fn, inputs, calls)
    if out is None:
        return
    k = model.num_classes
    full = _mimo_reference(model, x.unsqueeze(1).expand(-1, m, *x.shape[1:]) if single else x)
    if case["call"] == "forward":
        want = full
    elif case["call"] == "member":
        want = full[:, case["index"]]
    else:
        want = (torch.logsumexp(torch.log_softmax(full, -1), 1) - math.log(m) if case["average"] == "prob"
                else full.mean(1))
    _check(tuple(out.shape) == tuple(want.shape), f"shape {tuple(out.shape)}, want {tuple(want.shape)} (K={k})", inputs)
    _check(out.dtype == mdt, f"dtype {out.dtype}, want the model's {mdt}", inputs)
    tol = 1e-9 if mdt == torch.float64 and x.dtype == torch.float64 else 1e-4 if x.dtype in (
        torch.float32, torch.float64) else 2e-2
    _close(out, want, tol, tol, f"MIMO {case['call']} against a float64 computation", inputs)
    event(f"MIMO {case['call']}: checked against float64")


# ---------------------------------------------------------------------------------------------
# DistanceMap

@st.composite
def dml_cases(draw):
    fr = draw(st.sampled_from([0.0, 0.0, 0.2]))
    case = dict(faults=set())
    case["form"] = draw(st.sampled_from(FORMS))
    case["N"] = draw(st.integers(1, 5))
    case["centers"] = draw(st.sampled_from(["identity", "1d", "tensor"]))
    if case["centers"] == "1d":
        case["N"] = 1
    case["C"] = draw(st.integers(1, case["N"])) if case["centers"] == "identity" else draw(st.integers(1, 4))
    case["variant"] = draw(st.sampled_from(["dml", "dml", "rdml", "aug"]))
    case["sigma"] = draw(st.sampled_from([0.0, 0.1, 1.0]))
    case["samples"] = draw(st.integers(1, 3))
    case["seed"] = draw(st.sampled_from([None, 0, 7, 2**62]))
    case["eps"] = draw(st.sampled_from([0.0, 1e-12, 1e-3]))
    case["trainable"] = draw(st.sampled_from(["all", "none", "first"]))
    case["init"] = draw(st.sampled_from(["uniform", 0.5, 2]))
    for name, bad in (("sigma", [-1.0, math.nan, math.inf, "0.1"]), ("samples", [0, -1, 1.5, True]),
                      ("seed", [-1, 2**64, 1.5]), ("eps", [-1.0, math.inf, math.nan]),
                      ("init", ["normal", 0, -1, math.nan]), ("form", ["TRIL", None])):
        if _chance(draw, fr / 3):
            case[name] = draw(st.sampled_from(bad))
            case["faults"].add(name)
    if _chance(draw, fr / 3) and case["centers"] == "identity" and case["N"] < 5:
        case["C"] = case["N"] + 1
        case["faults"].add("centers")
    case["double_module"] = _chance(draw, 0.25)
    case["B"] = _dim(draw, 4)
    case["dtype"] = (draw(st.sampled_from(PREFERRED_DTYPES)) if _chance(draw, 0.3)
                     else "float64" if case["double_module"] else "float32")
    case["layout"] = draw(st.sampled_from(LAYOUTS))
    case["device"] = "meta" if _chance(draw, 0.1) else "cpu"
    case["wrong_shape"] = _chance(draw, fr)
    case["poison"] = draw(st.sampled_from([None, None, None, "nan", "inf"]))
    case["data_seed"] = draw(st.integers(0, 2**31 - 1))
    return case


@_fuzz(600)
@given(case=dml_cases())
# AUG-DML on an empty batch raised RuntimeError (view(samples, 0, -1) is ambiguous).
@example(case=dict(faults=set(), form="full", N=4, centers="identity", C=3, variant="aug", sigma=0.1, samples=3,
                   seed=3, eps=1e-12, trainable="all", init="uniform", double_module=False, B=0, dtype="float32",
                   layout="contiguous", device="cpu", wrong_shape=False, poison=None, data_seed=0))
def test_fuzz_distance_map(case):
    n, c = case["N"], case["C"]
    gen = torch.Generator().manual_seed(case["data_seed"])
    centers = torch.randn(c, n, generator=gen) if case["centers"] == "tensor" else case["centers"]
    trainable = [0] if case["trainable"] == "first" else case["trainable"]
    kw = dict(form=case["form"], trainable=trainable, init=case["init"], centers=centers,
              randomized=case["variant"] == "rdml", augment=case["variant"] == "aug", sigma=case["sigma"],
              samples=case["samples"], seed=case["seed"], eps=case["eps"],
              generator=torch.Generator().manual_seed(case["data_seed"] + 1))
    layer = _call(lambda: DistanceMap(n, c, **kw), {"in_features": n, "num_classes": c, **kw}, case["faults"])
    if layer is None:
        return
    mdt = torch.float64 if case["double_module"] else torch.float32
    layer = layer.to(mdt)
    shape = (case["B"], n + 1) if case["wrong_shape"] else (case["B"], n)
    s = (1, shape[1]) if case["layout"] == "expanded" and shape[0] > 0 else shape
    x = torch.randn(s, generator=gen, dtype=torch.float64)
    if case["poison"] and x.numel():
        x = _poison(x, case["poison"], gen)
    if x.shape != shape:
        x = x.expand(shape)
    x = _finish(x, case["dtype"], case["device"], "contiguous" if case["layout"] == "expanded" else case["layout"])
    faults = set()
    if case["wrong_shape"] or x.dtype != mdt or x.device.type == "meta":
        faults.add("x")
    inputs = {"x": x, "layer dtype": mdt, **{k: case[k] for k in ("form", "variant", "sigma", "samples", "seed")}}
    before = _snapshot({"x": x})
    out = _call(lambda: layer(x), inputs, faults)
    if out is None:
        return
    _unchanged(before, {"x": x}, inputs)
    _check(tuple(out.shape) == (case["B"], c) and out.dtype == mdt, f"{_describe(out)}, want [{case['B']}, {c}]",
           inputs)
    code = ref_maha.FORMS[case["form"]]
    p = layer.factor().detach().double()[None]
    cen = layer.centers.detach().double()[None]
    x64 = x.double()
    if case["variant"] == "dml" or case["sigma"] == 0 and case["variant"] == "rdml":
        want = -ref_maha.mahalanobis(x64, p, cen, form=code, eps=case["eps"])[:, 0]
    elif case["variant"] == "rdml" and case["seed"] is not None:
        z = ref_maha.normal_noise(case["seed"], (case["samples"], 1, n, n)).double()
        want = -ref_maha.randomized_mahalanobis(x64, p, cen, z, sigma=case["sigma"], form=code, eps=case["eps"])[:, 0]
    elif case["variant"] == "aug" and case["seed"] is not None:
        g = torch.Generator().manual_seed(case["seed"])
        z = torch.randn((case["samples"], *x.shape), generator=g, dtype=x.dtype).double()
        xs = (x64.unsqueeze(0) + case["sigma"] * z).flatten(0, 1)
        d = ref_maha.mahalanobis(xs, p, cen, form=code, eps=case["eps"])[:, 0]
        want = -d.view(case["samples"], x.shape[0], c).mean(0)
    else:  # fresh noise each call: finite where x is
        fin = torch.isfinite(x).all(1)
        _check(bool(torch.isfinite(out[fin]).all()), "non-finite logits for finite features", inputs)
        return
    rtol = 1e-9 if mdt == torch.float64 else 1e-4
    _close(out, want, rtol, rtol * 10, f"DistanceMap ({case['variant']}) against the float64 reference", inputs,
           nonfinite_alike=True)  # NaN or inf: a 0 * inf in the dense perturbed factor may make either
    event(f"DistanceMap {case['variant']}: checked against the reference")


# ---------------------------------------------------------------------------------------------
# pyens.evaluate

class _Pixels(torch.nn.Module):
    """``[B, C, H, W] -> [B, K]`` for any float input dtype (computed in float32)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, z):
        f = z.float().flatten(1)
        w = torch.randn(self.k, f.shape[1], generator=torch.Generator().manual_seed(f.shape[1])) * 3
        return torch.nn.functional.linear(f, w, torch.linspace(-0.1, 0.1, self.k))


@st.composite
def eval_cases(draw):
    fr = draw(st.sampled_from([0.0, 0.0, 0.25]))
    case = dict(faults=set())
    case["K"] = draw(st.integers(1, 4))
    case["count"] = _dim(draw, 5, 0.05)
    case["img"] = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    case["dtype"] = draw(st.sampled_from(PREFERRED_FLOATS))
    case["layout"] = draw(st.sampled_from(LAYOUTS))
    case["seed"] = draw(st.integers(0, 2**31 - 1))
    case["attacks"] = draw(st.sampled_from(["specs", "specs", "none", "preset"]))
    case["steps"] = draw(st.integers(1, 2))
    case["n"] = draw(st.sampled_from([1, 2, 3, 1000]))
    case["batch_size"] = draw(st.sampled_from([1, 2, 250]))
    case["eps"] = {"linf": 0.1, "l2": 0.5, "l1": 1.0}
    case["dataset"] = None
    case["device"] = draw(st.sampled_from(["cpu", "auto", torch.device("cpu")]))
    case["data_fault"] = None
    for name, bad in (("n", [0, -1, 2.5, True]), ("batch_size", [0, -3, 1.5]),
                      ("device", ["meta", "foo", torch.device("meta")]), ("dataset", ["foo"]),
                      ("eps", [{"linf": -0.1, "l2": 0.5, "l1": 1.0}, {"linf": "a", "l2": 0.5, "l1": 1.0},
                               [1, 2], {"l7": 1.0}])):
        if _chance(draw, fr / 4):
            case[name] = draw(st.sampled_from(bad))
            case["faults"].add(name)
    if case["attacks"] == "preset" and not case["faults"] & {"eps", "dataset"} and draw(st.booleans()):
        case["eps"], case["dataset"] = None, "mnist"  # the paper's radii
    if case["attacks"] != "preset" and "eps" not in case["faults"]:
        case["eps"] = None  # (an invalid eps stays: eps= with a list of specs is itself refused)
    if case["attacks"] != "preset" and "dataset" in case["faults"]:
        case["faults"].discard("dataset")  # a list of specs carries its own radii; dataset only labels
        case["dataset"] = None
    if _chance(draw, fr):
        case["data_fault"] = draw(st.sampled_from(["int_images", "nan", "no_examples", "labels_float",
                                                   "labels_shape", "labels_negative", "tuple3", "lists", "meta"]))
        case["faults"].add("data")
    return case


@_fuzz(150)
@given(case=eval_cases())
# Integer images, an empty data set, a float n or batch_size, a tuple that is not (x, y) and
# device="meta" raised RuntimeError / IndexError / NotImplementedError or a ValueError naming nothing.
@example(case=dict(faults={"data"}, K=3, count=3, img=(1, 2, 2), dtype="float32", layout="contiguous", seed=0,
                   attacks="specs", steps=1, n=3, batch_size=2, eps=None, dataset=None, device="cpu",
                   data_fault="int_images"))
@example(case=dict(faults={"batch_size"}, K=3, count=3, img=(1, 2, 2), dtype="float32", layout="contiguous",
                   seed=0, attacks="specs", steps=1, n=3, batch_size=0, eps=None, dataset=None, device="cpu",
                   data_fault=None))
@example(case=dict(faults={"device"}, K=3, count=3, img=(1, 2, 2), dtype="float32", layout="contiguous",
                   seed=0, attacks="specs", steps=1, n=3, batch_size=2, eps=None, dataset=None, device="meta",
                   data_fault=None))
def test_fuzz_evaluate(case):
    gen = torch.Generator().manual_seed(case["seed"])
    faults = set(case["faults"])
    count, K = case["count"], case["K"]
    shape = (count, *case["img"])
    s = (1, *shape[1:]) if case["layout"] == "expanded" and count > 0 else shape
    x = torch.rand(s, generator=gen, dtype=torch.float64)
    if x.shape != shape:
        x = x.expand(shape)
    x = _finish(x, case["dtype"], "cpu", "contiguous" if case["layout"] == "expanded" else case["layout"])
    y = torch.randint(0, K, (count,), generator=gen)
    df = case["data_fault"]
    data = (x, y)
    if count == 0:
        faults.add("data")
    if df == "int_images":
        data = ((x.double() * 255).to(torch.uint8), y)
    elif df == "nan":
        data = (torch.full_like(x, math.nan), y)
    elif df == "no_examples":
        data = (x[:0], y[:0])
    elif df == "labels_float":
        data = (x, y.double())
    elif df == "labels_shape":
        data = (x, y[:, None])
    elif df == "labels_negative":
        data = (x, y - K)
    elif df == "tuple3":
        data = (x, y, y)
    elif df == "lists":
        data = (x.tolist(), y.tolist())
    elif df == "meta":
        data = (x.to("meta"), y.to("meta"))
    if df in ("nan", "labels_negative", "labels_shape") and count == 0:
        faults.add("data")
    model = _Pixels(K)
    radii = {"linf": 0.1, "l2": 0.5, "l1": 1.0}
    attacks = {"specs": lambda: pgd_specs(radii=radii, steps=case["steps"]), "none": lambda: [],
               "preset": lambda: "pgd"}[case["attacks"]]()
    kw = dict(attacks=attacks, n=case["n"], batch_size=case["batch_size"], device=case["device"],
              dataset=case["dataset"], eps=case["eps"], progress=False, seed=case["seed"] % 100)
    if case["attacks"] == "preset" and case["eps"] is None and case["dataset"] is None:
        faults.add("dataset")  # the radii are never guessed for foreign data
    inputs = {"data": data, **kw, "K": K}
    report = _call(lambda: pyens.evaluate(model, data, **kw), inputs, faults)
    if report is None:
        return
    m = min(case["n"], count)
    xs, ys = data[0][:m], data[1][:m]
    _check(report.n == m and tuple(report.clean.shape) == (m,) and report.clean.dtype == torch.bool,
           f"clean {_describe(report.clean)}, want [{m}] bool", inputs)
    want_clean = model(xs).argmax(-1) == ys
    _check(torch.equal(report.clean, want_clean), "clean accuracy differs from the model's own predictions", inputs)
    event(f"evaluate: {len(report.attacks)} attacks checked")
    expect = len(attacks) if isinstance(attacks, list) else 3
    _check(len(report.attacks) == expect, f"{len(report.attacks)} attack results, want {expect}", inputs)
    for a in report.attacks:
        _check(tuple(a.correct.shape) == (m,) and a.correct.dtype == torch.bool, f"{a.name}: {_describe(a.correct)}",
               inputs)
        if a.distance is not None and a.eps is not None:
            broken = ~a.correct
            _check(bool((a.distance[broken] <= a.eps * (1 + 1e-4) + 1e-5).all()),
                   f"{a.name}: an example counted as broken lies outside eps", inputs)
