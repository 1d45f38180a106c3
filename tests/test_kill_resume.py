"""kill -9 at any moment loses nothing (issue 17, item 2).

A tiny run is trained by ``python -m pyens train`` in a subprocess and SIGKILLed at several
moments, each found by polling the run directory (never by a blind sleep); ``--resume`` then
carries it on, and the finished weights must be bit-identical to an uninterrupted run's. The
test hook ``PYENS_TEST_SLOW_CHECKPOINT_WRITE`` (pyens.training.checkpoint) holds each
checkpoint write open for a while, so that a kill can land inside one and so that the moment
of a kill stays put on a busy machine. Also: damaged checkpoints are errors, never a silent
fresh start, and a run killed before its first checkpoint restarts at step 0 and says so.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pyens
from pyens import cli
from pyens.training import checkpoint

TIMEOUT = 60  # seconds, for every wait on a subprocess
SLOW = "0.6"  # seconds each checkpoint write is held open in the processes that get killed


def _train_args(tmp_path: Path, out: Path) -> list[str]:
    config = tmp_path / "frequent.toml"
    # checkpoint_minutes = 0: a checkpoint after every step, so kills land mid-epoch with a
    # mid-epoch checkpoint behind them; eval_size: a small per-epoch diagnostic.
    config.write_text("checkpoint_minutes = 0\neval_size = 20\n")
    return [sys.executable, "-m", "pyens", "train", "--config", str(config), "--method", "standard",
            "--dataset", "mnist", "--model", "small_cnn", "--train-size", "60", "--batch-size", "20",
            "--epochs", "3", "--no-eval", "--no-progress", "--out", str(out)]


def _resume_args(out: Path) -> list[str]:
    return [sys.executable, "-m", "pyens", "train", "--resume", "--out", str(out), "--no-eval", "--no-progress"]


def _start(args: list[str], slow: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(checkpoint.SLOW_WRITE_ENV, None)
    if slow:
        env[checkpoint.SLOW_WRITE_ENV] = slow
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(args: list[str]) -> str:
    proc = _start(args)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return err


def _kill_when(proc: subprocess.Popen, condition, moment: str) -> str:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; its stderr."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {moment}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {moment} within {TIMEOUT} s")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself before the kill at {moment}"
    return err


def _temporaries(out: Path) -> set[str]:
    return {p.name for p in out.glob(f".{checkpoint.CHECKPOINT}.*.tmp")}


def _state(out: Path) -> dict:
    return checkpoint.load(out / checkpoint.CHECKPOINT)


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sigkill_at_any_moment_then_resume_is_bit_identical(tmp_path):
    ref, out = tmp_path / "straight", tmp_path / "killed"
    _finish(_train_args(tmp_path, ref))
    ckpt = out / checkpoint.CHECKPOINT

    # 1. Inside the first checkpoint write: no checkpoint yet, only config.toml (and a stray
    #    temporary file). Resume must restart at step 0, and say so.
    _kill_when(_start(_train_args(tmp_path, out), SLOW), lambda: _temporaries(out) and not ckpt.exists(),
               "first checkpoint write")
    assert not ckpt.exists() and _temporaries(out), "the kill did not land inside the first write"
    assert (out / "config.toml").stat().st_size > 0

    # 2. Mid-epoch, just after a mid-epoch checkpoint (while the next step runs or is saved).
    err = _kill_when(_start(_resume_args(out), SLOW), ckpt.exists, "mid-epoch checkpoint")
    assert "has no checkpoint.pt yet" in err and "starting it from step 0" in err
    state = _state(out)
    assert state["epoch"] == 0 and 1 <= state["batch"] < 3, (state["epoch"], state["batch"])

    # 3. Inside a checkpoint write, with an older checkpoint in place: that one must survive.
    stale, before = _temporaries(out), state["step"]
    _kill_when(_start(_resume_args(out), SLOW), lambda: _temporaries(out) - stale, "checkpoint write")
    assert _temporaries(out) - stale, "the kill did not land inside a checkpoint write"
    assert _state(out)["step"] == before  # the interrupted write left the old checkpoint whole

    # 4. Right after an epoch end (its checkpoint written and its metrics line appended).
    _kill_when(_start(_resume_args(out), SLOW), lambda: len(_metrics(out)) >= 1, "epoch end")
    assert _state(out)["epoch"] == 1

    # 5. Resume to the end.
    _finish(_resume_args(out))
    got, want = _state(out), _state(ref)
    assert got["step"] == want["step"] == 9
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    for i, s in want["optimizer"]["state"].items():  # momentum buffers too
        assert all(torch.equal(got["optimizer"]["state"][i][k], s[k]) for k in s), i
    keys = ("epoch", "step", "train_loss", "train_acc", "eval_clean_acc")
    assert [{k: h[k] for k in keys} for h in _metrics(out)] == [{k: h[k] for k in keys} for h in _metrics(ref)]
    assert not _temporaries(out), "resume leaves no stray temporary files"


TINY = dict(dataset="mnist", model="small_cnn", train_size=40, batch_size=20, epochs=1, steps=1,
            eval_size=20, progress=False)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after its first step (max_steps=1), resumable with max_steps=0."""
    out = tmp_path_factory.mktemp("runs") / "half"
    pyens.train("standard", out=str(out), max_steps=1, **TINY)
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_checkpoint_is_an_error_never_a_fresh_start(stopped_run, tmp_path, damage, capsys):
    run = _copy_run(stopped_run, tmp_path / "run")
    path = run / checkpoint.CHECKPOINT
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[:len(data) // 2])
    files = {f.name: f.read_bytes() for f in run.iterdir()}
    unreadable = f"checkpoint: {path} is not a readable checkpoint"

    with pytest.raises(ValueError, match=unreadable.replace(".", r"\.")):
        pyens.load_run(run)
    with pytest.raises(ValueError, match=unreadable.replace(".", r"\.")):
        pyens.train("standard", out=str(run), resume=True, max_steps=0, **TINY)
    assert cli.main(["train", "--resume", "--out", str(run), "--max-steps", "0", "--no-eval", "--no-progress"]) == 2
    assert unreadable in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in run.iterdir()} == files  # nothing trained, nothing rewritten


def test_resume_before_the_first_checkpoint_restarts_at_step_0_and_says_so(stopped_run, tmp_path, capsys):
    """A run killed before its first checkpoint has its config.toml only: resume starts it at
    step 0 (what the killed run did too, so the result is bit-identical) with a notice."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text((stopped_run / "config.toml").read_text())
    result = pyens.train("standard", out=str(run), resume=True, max_steps=1, **TINY)
    assert "has no checkpoint.pt yet" in capsys.readouterr().err
    want = checkpoint.load(stopped_run / checkpoint.CHECKPOINT)["model"]
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in want.items())

    # A run claimed but killed before a byte of its config was written: an error, not a guess.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.toml").write_bytes(b"")
    with pytest.raises(ValueError, match=r"resume: .*config\.toml is empty"):
        pyens.train("standard", out=str(empty), resume=True, **TINY)
