"""pyens selftest and the first-use self-check of dispatch: a broken backend is caught, skipped
and reported; verdicts are cached per device, build and torch version; the switches work."""
import json
import warnings

import pytest
import torch

import pyens
from pyens.cli import main
from pyens.ops import lp_step, mahalanobis, selftest, use_backend
from pyens.ops.dispatch import OPS, archs_cover, forget_choices, self_check_state

CPU = pytest.mark.skipif("cpu" not in pyens.ops.available_backends("lp_step", "cpu"),
                         reason="the C++ CPU backend is not built")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty verdict cache and no choice or verdict remembered, before and after the test
    (a verdict about a deliberately broken kernel must not outlive it)."""
    monkeypatch.setenv("PYENS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PYENS_SELFTEST", raising=False)
    monkeypatch.delenv("PYENS_BACKEND", raising=False)
    forget_choices()
    yield tmp_path
    forget_choices()


def _lp_args():
    d, g, x = selftest.make_rows(4, 11, torch.float32, 0)
    return d, g, x


def _spy(monkeypatch, op, backend, wrap=None):
    """Replace ``op``'s ``backend`` kernel by ``wrap(kernel)`` (the kernel itself by default) and
    count its calls."""
    spec = OPS[op].kernels[backend]
    real_load = spec.load
    calls = []

    def load():
        kernel = real_load()
        inner = wrap(kernel) if wrap else kernel
        if callable(inner) and not isinstance(inner, type):
            def counted(*a, **k):
                calls.append(1)
                return inner(*a, **k)
            return counted
        return inner

    monkeypatch.setattr(spec, "load", load)
    return calls


# ---------------------------------------------------------------------------------------------
# the selftest itself

@CPU
def test_selftest_passes_on_the_cpu_backend():
    results = selftest.run("cpu", backend="cpu")
    assert results and all(r.ok for r in results), selftest.format_table(results)
    cases = {(r.op, r.case) for r in results}
    assert sum(op == "lp_step" for op, _ in cases) >= 5 and sum(op == "mahalanobis" for op, _ in cases) >= 8
    assert {r.dtype for r in results} == {"float32", "float64"}  # the cpu kernels' dtypes
    # every failing-capable comparison ran: errors are measured, not skipped
    assert all(0 <= r.max_err < 1e-4 for r in results)


@CPU
def test_cli_selftest_prints_the_table_and_exits_zero(capsys):
    assert main(["selftest", "--quick", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["op", "backend", "dtype", "case", "max", "error", "pass"]
    assert "FAIL" not in out and " passed, 0 failed" in out


def test_cli_selftest_rejects_a_backend_that_cannot_run(capsys):
    assert main(["selftest", "--backend", "cuda", "--device", "cpu"]) == 2
    assert "backend 'cuda' cannot run on cpu" in capsys.readouterr().err


@CPU
def test_selftest_catches_a_wrong_kernel_and_exits_nonzero(monkeypatch, capsys, fresh):
    def wrong(kernel):
        def run(mode, *args):
            out, flags = kernel(mode, *args)
            return (out * 1.001 if mode == 2 else out), flags  # only the fused step is off
        return run

    _spy(monkeypatch, "lp_step", "cpu", wrong)
    results = selftest.run("cpu", backend="cpu", ops=["lp_step"], quick=True)
    bad = [r for r in results if not r.ok]
    assert bad and all("mode=step" in r.detail for r in bad)
    assert main(["selftest", "--quick", "--backend", "cpu"]) == 1
    assert "FAIL lp_step cpu" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# first use: detected, skipped, reported, the fallback used

@CPU
def test_broken_backend_is_skipped_with_one_warning_and_the_fallback_runs(monkeypatch, fresh):
    _spy(monkeypatch, "lp_step", "cpu", lambda k: (lambda *a: (k(*a)[0] + 1e-3, k(*a)[1])))
    d, g, x = _lp_args()
    with pytest.warns(RuntimeWarning) as record:
        out = lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1)
        lp_step(d, g, x, norm="l1", eps=2.0, alpha=0.3)  # the choice stands: no second check or warning
    messages = [str(w.message) for w in record if "pyens" in str(w.message)]
    assert len(messages) == 1, messages
    assert "runs on the reference backend" in messages[0]
    assert "cpu failed its self-check" in messages[0] and "[odd n=97" in messages[0]
    assert "pyens selftest --device cpu --backend cpu" in messages[0]
    with use_backend("reference"):
        want = lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1)
    assert torch.equal(out, want)
    state = self_check_state("lp_step", "cpu", "cpu")
    assert state.startswith("failed (this process)") and "odd n=97" in state
    report = pyens.ops.backends()["lp_step"]["cpu"]
    assert report["selected"] == "reference" and report["self_check"]["cpu"].startswith("failed")
    # the other op's kernels are sound: it keeps the cpu backend, without a warning
    x2, P, c = selftest.make_points(4, 2, 3, 5, "tril", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mahalanobis(x2, P, c)
    assert pyens.ops.backends()["mahalanobis"]["cpu"]["selected"] == "cpu"


@CPU
def test_a_wrong_backward_alone_is_caught(monkeypatch, fresh):
    class Wrong:
        def __init__(self, k):
            self.k = k

        def __getattr__(self, name):
            return getattr(self.k, name)

        def backward(self, *args):
            dx, dP, dc = self.k.backward(*args)
            return dx, dP * 1.01, dc

    _spy(monkeypatch, "mahalanobis", "cpu", Wrong)
    x, P, c = selftest.make_points(4, 2, 3, 5, "tril", dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match=r"cpu failed its self-check .*dP"):
        mahalanobis(x, P, c)


@CPU
def test_a_crashing_kernel_fails_its_check(monkeypatch, fresh):
    def crash(kernel):
        def run(*args):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return run

    _spy(monkeypatch, "lp_step", "cpu", crash)
    d, g, x = _lp_args()
    with pytest.warns(RuntimeWarning, match="raised RuntimeError: CUDA error: no kernel image"):
        lp_step(d, g, x, norm="linf", eps=0.1, alpha=0.01)


@CPU
def test_a_forced_backend_is_not_checked(monkeypatch, fresh):
    calls = _spy(monkeypatch, "lp_step", "cpu")
    d, g, x = _lp_args()
    with use_backend("cpu"), warnings.catch_warnings():
        warnings.simplefilter("error")
        lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1)
    assert len(calls) == 1  # the call itself, no check
    assert not list(fresh.iterdir())


# ---------------------------------------------------------------------------------------------
# the verdict cache

@CPU
def test_verdict_is_cached_keyed_and_invalidated(monkeypatch, fresh):
    calls = _spy(monkeypatch, "lp_step", "cpu")
    d, g, x = _lp_args()
    lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1)
    checked = len(calls) - 1
    assert checked > 0  # the quick subset ran through the kernel
    files = list(fresh.glob("selftest-lp_step-cpu-*.json"))
    assert len(files) == 1 and not list(fresh.glob("*.tmp"))
    data = json.loads(files[0].read_text())
    key = data["key"]
    assert data["ok"] is True and data["failed"] == "" and "seconds" in data
    assert key["op"] == "lp_step" and key["backend"] == "cpu" and key["torch"] == torch.__version__
    assert key["device"].startswith("cpu") and key["capability"] == ""
    assert key["build"] == selftest.build_key("cpu") and pyens.__version__ in key["build"]
    mod = pyens.ops.dispatch.compiled_extension()[0]
    assert selftest.file_identity(mod.__file__) in key["build"]  # a rebuild changes the key
    assert self_check_state("lp_step", "cpu", "cpu").startswith("passed (this process")

    # a new process (here: forgotten choices) reads the verdict instead of running the cases
    forget_choices()
    calls.clear()
    lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1)
    assert len(calls) == 1
    assert self_check_state("lp_step", "cpu", "cpu").startswith("passed (this process")
    forget_choices()
    assert self_check_state("lp_step", "cpu", "cpu").startswith("passed (cached")

    # another torch: another key, so the cases run again and a second file is written
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    forget_choices()
    calls.clear()
    lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1)
    assert len(calls) == 1 + checked
    assert len(list(fresh.glob("selftest-lp_step-cpu-*.json"))) == 2

    # an unreadable file is no verdict: the check runs and rewrites it
    monkeypatch.undo()
    monkeypatch.setenv("PYENS_CACHE_DIR", str(fresh))
    calls = _spy(monkeypatch, "lp_step", "cpu")
    files[0].write_text("{not json")
    forget_choices()
    lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1)
    assert len(calls) == 1 + checked
    assert json.loads(files[0].read_text())["ok"] is True


@CPU
def test_a_first_call_under_a_tensor_mode_checks_on_real_tensors(fresh):
    """A first call under FakeTensorMode (tracing, shape propagation), a FlopCounterMode or a
    meta default device must not run the cases on fake tensors: that would fail and cache the
    failure on disk, moving every later process onto the reference."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode():
        fx = torch.rand(4, 11)
        with pytest.raises(Exception):  # the compiled kernel has no fake implementation here
            lp_step(fx, fx, fx, norm="l2", eps=0.5, alpha=0.1)
    assert self_check_state("lp_step", "cpu", "cpu").startswith("passed (this process")
    forget_choices()
    for f in fresh.glob("selftest-*.json"):
        f.unlink()
    d, g, x = _lp_args()
    with FlopCounterMode(display=False) as counter, torch.device("meta"):
        lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1)
    assert self_check_state("lp_step", "cpu", "cpu").startswith("passed (this process")
    assert counter.get_total_flops() == 0  # the check's own matmuls are not the caller's


def test_build_key_changes_with_the_build(monkeypatch):
    from pyens.ops import dispatch

    class Mod:
        __file__ = __file__  # this test file stands in for the extension

    monkeypatch.setattr(dispatch, "compiled_extension", lambda: (Mod, None))
    before = selftest.build_key("cpu")
    monkeypatch.setattr(pyens, "__version__", pyens.__version__ + "+other")
    assert selftest.build_key("cpu") != before


def test_cache_dir_and_unwritable_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("PYENS_CACHE_DIR", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert selftest.cache_dir() == tmp_path / "xdg" / "pyens"
    monkeypatch.setenv("PYENS_CACHE_DIR", str(tmp_path / "mine"))
    assert selftest.cache_dir() == tmp_path / "mine"
    # a cache that cannot be written (a file where the directory should be) is not an error
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PYENS_CACHE_DIR", str(tmp_path / "file" / "sub"))
    key = selftest.cache_key("lp_step", "cpu", torch.device("cpu"))
    selftest.write_cached(key, {"ok": True})
    assert selftest.read_cached(key) is None


# ---------------------------------------------------------------------------------------------
# switches and pyens info

@CPU
def test_selftest_env_zero_turns_the_check_off(monkeypatch, fresh, capsys):
    monkeypatch.setenv("PYENS_SELFTEST", "0")
    _spy(monkeypatch, "lp_step", "cpu", lambda k: (lambda *a: (k(*a)[0] + 1.0, k(*a)[1])))
    d, g, x = _lp_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1)
    with use_backend("reference"):
        assert not torch.equal(out, lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1))  # the broken kernel ran
    assert not list(fresh.iterdir())
    assert self_check_state("lp_step", "cpu", "cpu") == "disabled (PYENS_SELFTEST=0)"
    assert main(["info"]) == 0
    assert "lp_step              cpu   cpu       disabled (PYENS_SELFTEST=0)" in capsys.readouterr().out


@CPU
def test_info_shows_each_backends_state(fresh, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "lp_step              cpu   cpu       not run yet (runs on first use)" in out
    assert "lp_step              cpu   reference not checked (the reference itself)" in out
    d, g, x = _lp_args()
    lp_step(d, g, x, norm="l2", eps=0.5, alpha=0.1)
    assert main(["info"]) == 0
    assert "lp_step              cpu   cpu       passed (this process" in capsys.readouterr().out


@pytest.mark.parametrize("archs, cap, covered", [
    ("80-real 90-real", (8, 0), True),
    ("80-real 90-real", (8, 6), True),     # SASS runs on later minors of its major
    ("80-real 90-real", (9, 0), True),
    ("80-real 90-real", (7, 5), False),    # T4
    ("80-real 90-real", (7, 0), False),    # V100
    ("80-real 90-real", (10, 0), False),   # no PTX: nothing for a newer major
    ("80-real 90", (12, 0), True),         # PTX is compiled by the driver for newer devices
    ("80-real 90-virtual", (9, 0), True),
    ("86-real", (8, 0), False),
    ("native", (7, 5), True),              # CMake's symbolic values: trusted, the self-check decides
])
def test_cuda_architectures_cover_a_device(archs, cap, covered):
    assert archs_cover(archs, cap) is covered
