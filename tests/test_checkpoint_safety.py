"""Checkpoints load without running code (issue 17, item 1).

Every loader uses ``torch.load(weights_only=True)``; a checkpoint that needs more is a
ValueError naming the file and the refused global, and nothing of it runs. Checkpoints of
earlier versions (NumPy RNG state as NumPy arrays) are converted by the explicit
``pyens convert-checkpoint RUN --trust``, the only full unpickle in pyens.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyens
from pyens import cli
from pyens.training import checkpoint

TINY = dict(dataset="mnist", model="small_cnn", train_size=40, batch_size=20, epochs=1, steps=1,
            eval_size=20, progress=False)


class _Payload:
    """Unpickling this runs ``touch <marker>``, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-epoch run, and one stopped after its first step (resumable)."""
    base = tmp_path_factory.mktemp("runs")
    pyens.train("standard", out=str(base / "done"), **TINY)
    pyens.train("standard", out=str(base / "half"), max_steps=1, **TINY)
    return base


def _copy_run(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _weights(run):
    return checkpoint.load(run / checkpoint.CHECKPOINT)["model"]


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _old_format(state: dict) -> dict:
    """The state as pyens wrote it before: NumPy's RNG state as np.random.get_state()'s tuple."""
    old = dict(state, rng=dict(state["rng"]))
    # spelled out here, not converted by pyens: the old format is numpy's own, whatever pyens does
    numpy = state["rng"]["numpy"]
    old["rng"]["numpy"] = (numpy["name"], numpy["key"].numpy().astype(np.uint32), numpy["pos"],
                           numpy["has_gauss"], numpy["cached_gaussian"])
    old["history"] = [dict(h, train_loss=np.float64(h["train_loss"])) for h in state["history"]]
    return old


def _poison(run, marker):
    path = run / checkpoint.CHECKPOINT
    state = checkpoint.load(path)
    state["extra"] = _Payload(marker)
    torch.save(state, path)
    return path


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    """Every stream, NumPy's cached Gaussian included, comes back exactly from a safe load."""
    np.random.seed(3)
    np.random.standard_normal()  # leaves has_gauss = 1 and a cached value
    random.seed(4)
    random.gauss(0, 1)
    g = torch.Generator().manual_seed(5)
    checkpoint.atomic_save({"rng": checkpoint.rng_state(g)}, tmp_path / "c.pt")
    want = (np.random.standard_normal(3), np.random.rand(3), random.random(), random.gauss(0, 1),
            torch.rand(3), torch.rand(3, generator=g))
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    g = torch.Generator()
    checkpoint.set_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"], g)
    got = (np.random.standard_normal(3), np.random.rand(3), random.random(), random.gauss(0, 1),
           torch.rand(3), torch.rand(3, generator=g))
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2:4] == want[2:4]
    assert torch.equal(got[4], want[4]) and torch.equal(got[5], want[5])


def test_a_malicious_checkpoint_runs_nothing_and_is_named(tiny_run, tmp_path):
    run = _copy_run(tiny_run / "half", tmp_path / "run")
    marker = tmp_path / "pwned"
    path = _poison(run, marker)
    before = path.read_bytes()
    refused = r"checkpoint: .*checkpoint\.pt needs (posix|os)\.system, which safe \(weights-only\) loading refuses"

    with pytest.raises(ValueError, match=refused):
        pyens.load_run(run)
    with pytest.raises(ValueError, match=refused):
        pyens.train("standard", out=str(run), resume=True, max_steps=0, **TINY)
    cmd = subprocess.run([sys.executable, "-m", "pyens", "eval", str(run), "--eval-n", "20", "--no-progress"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cmd.returncode == 2, cmd.stderr
    assert str(path) in cmd.stderr and ("posix.system" in cmd.stderr or "os.system" in cmd.stderr), cmd.stderr
    assert "Traceback" not in cmd.stderr
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report"), "--no-progress"]) == 2

    assert not marker.exists(), "loading the checkpoint ran its payload"
    assert path.read_bytes() == before  # the failed resume wrote nothing over it
    # The payload is live: a full unpickle (what load did before) runs it. Without this the
    # test could pass with a payload that never fires.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_convert_checkpoint_without_trust_has_no_side_effect(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run / "half", tmp_path / "run")
    marker = tmp_path / "pwned"
    path = _poison(run, marker)
    before = sorted(p.name for p in run.iterdir())
    assert cli.main(["convert-checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--trust" in err and "system" in err and str(path) in err
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == before  # no backup, no rewrite


def test_an_old_checkpoint_is_converted_only_with_trust(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run / "half", tmp_path / "run")
    path = run / checkpoint.CHECKPOINT
    state = checkpoint.load(path)
    torch.save(_old_format(state), path)
    old_bytes = path.read_bytes()

    with pytest.raises(ValueError, match=r"needs numpy\..*pyens convert-checkpoint .*run --trust"):
        pyens.load_run(run)
    assert cli.main(["convert-checkpoint", str(run)]) == 2
    assert "--trust" in capsys.readouterr().err and path.read_bytes() == old_bytes

    with pytest.warns(UserWarning, match="unpickling .* fully"):
        assert cli.main(["convert-checkpoint", str(run), "--trust"]) == 0
    assert "checkpoint.pt.orig" in capsys.readouterr().out
    assert (run / "checkpoint.pt.orig").read_bytes() == old_bytes  # the original is kept
    converted = torch.load(path, weights_only=True)
    _assert_same_weights(converted["model"], state["model"])
    assert converted["history"] == state["history"]
    np_new, np_old = converted["rng"]["numpy"], state["rng"]["numpy"]
    assert torch.equal(np_new["key"], np_old["key"]) and {k: v for k, v in np_new.items() if k != "key"} == \
        {k: v for k, v in np_old.items() if k != "key"}
    _assert_same_weights(pyens.load_run(run).net.state_dict(), state["model"])

    # A second conversion has nothing to do, with or without --trust.
    assert cli.main(["convert-checkpoint", str(run)]) == 0
    assert "nothing to convert" in capsys.readouterr().out
    # Resuming the converted run continues exactly: same weights as the uninterrupted run.
    resumed = pyens.train("standard", out=str(run), resume=True, max_steps=0, **TINY)
    _assert_same_weights(resumed.model.state_dict(), _weights(tiny_run / "done"))
