"""The training loop behind :func:`pyens.train` and ``pyens train``."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pyens.atomic_files import atomic_write_text, remove_stray_temporaries
from pyens.training import checkpoint, distributed
from pyens.training.config import TrainConfig, config_from_dict, load_config
from pyens.training.methods import StepContext, get_method
from pyens.training.run import build_network, classifier
from pyens.training.run_dir import CHECKPOINT, RunDir
from pyens.training.schedules import lr_at

# Settings that may change when a run is resumed; anything else must match the saved config.
RESUMABLE_OVERRIDES = {"device", "checkpoint_minutes", "max_steps", "out"}


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained network (single model, MIMO or vanilla ensemble), in eval mode.
        config: the resolved config.
        history: one dict per finished epoch (also in ``out/metrics.jsonl``).
        checkpoint: path of the last checkpoint; out: the run directory.
        stopped_at: the step at which ``max_steps`` stopped training early (resumable from
            there with a larger ``max_steps``); None when training ran to its last epoch.
        total_steps: the optimizer steps of the whole schedule (epochs x batches per epoch).

    The network is ``model`` here and in :func:`~pyens.training.load_run`'s result.
    """

    model: nn.Module
    config: TrainConfig
    history: list = field(default_factory=list)
    checkpoint: Path | None = None
    out: Path | None = None
    replicas_agree: bool = True
    stopped_at: int | None = None
    total_steps: int | None = None

    @property
    def net(self) -> nn.Module:
        """The network, under :class:`~pyens.training.Run`'s old name (an alias of ``model``)."""
        return self.model

    @property
    def classifier(self) -> nn.Module:
        return classifier(self.model)


def train(method: str | None = None, *, config: str | Path | None = None, resume: bool = False,
          progress: bool = True, **overrides) -> TrainResult:
    """Train a MAT model, a DML ensemble's members, or a baseline.

    Args:
        method: a name from :data:`pyens.training.METHODS` (``"mat"``, ``"at"``, ...); it
            overrides the config's method.
        config: a TOML file or the name of a shipped config (``pyens.training.config_names()``).
        resume: continue the run in ``out`` from its last checkpoint, exactly (same RNG
            streams, same batches).
        progress: show a progress bar (loss, accuracy, images/s).
        **overrides: any :class:`~pyens.training.config.TrainConfig` field, e.g.
            ``dataset="mnist", model="small_cnn", members=3, norms=("l1", "l2", "linf"),
            epochs=5, steps=10, device="auto", out="runs/mat", seed=0``.

    Returns:
        A :class:`TrainResult` with the model, the per-epoch history and the checkpoint path.
    """
    if method is not None:
        overrides["method"] = method
    cfg = load_config(config, **overrides) if config else config_from_dict(overrides)
    cfg = cfg.resolved()
    if "members" in overrides and cfg.members != overrides["members"]:
        raise ValueError(f"members: method {cfg.method!r} trains {cfg.members} "
                         f"{'member' if cfg.members == 1 else 'members'} with norms {cfg.norms}; got "
                         f"{overrides['members']} (change norms to change the count)")
    d = distributed.setup(cfg.device)
    existed = bool(cfg.out) and Path(cfg.out).exists()
    out = _run_dir(cfg, resume, d)
    claimed = d.main and not resume  # this call created out/config.toml
    if resume:
        # With a config given, every field of it must match the run, not only the flags.
        cfg = _resumed_config(out, cfg, set(dataclasses.asdict(cfg)) if config else set(overrides))
        if d.main:  # left by checkpoint writes that a kill interrupted (the checkpoint itself is whole)
            remove_stray_temporaries(RunDir(out).checkpoint)
        if not RunDir(out).checkpoint.exists():
            # Stopped (killed) before its first checkpoint: nothing was trained, and starting
            # at step 0 is bit-identical to the run that was stopped. Said, never silent.
            if d.main:
                print(f"resume: {out} has no {CHECKPOINT} yet (the run stopped before its first "
                      "checkpoint); starting it from step 0 with its saved config", file=sys.stderr)
            resume = False
    cfg.out = str(out)
    try:
        trainer = _Trainer(cfg, out, resume, progress, d)
    except Exception:
        # The run could not start (data missing, network not buildable, ...): nothing was
        # trained, so the directory is not held; a kill here still leaves a resumable claim.
        if claimed:
            RunDir(out).release(remove_dir=not existed)
        raise
    return trainer.fit()


def _run_dir(cfg: TrainConfig, resume: bool, d: distributed.Dist) -> Path:
    """The run directory: ``cfg.out``, or the first free ``runs/<method>-...-seed<seed>[-n]``.

    A new run claims its directory by creating ``config.toml`` exclusively (on the main
    rank; the others receive the path), so two runs started together never share one.
    Resuming without ``out`` takes the newest run of that name.
    """
    out = None
    if d.main:
        out = _claim_run_dir(cfg, resume)
    return Path(distributed.broadcast_object(str(out) if out else None, d))


def _claim(out: Path, cfg: TrainConfig) -> bool:
    return RunDir(out).claim(dataclasses.replace(cfg, out=str(out)).to_toml())


def _claim_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    if cfg.out:
        out = Path(cfg.out)
        if resume or _claim(out, cfg):
            return out
        raise FileExistsError(f"out: {out} already holds a run (its config.toml); pass resume=True "
                              "(--resume) to continue it, or choose another out")
    base = Path("runs") / f"{cfg.method}-{cfg.dataset}-{cfg.model}-seed{cfg.seed}"
    candidates = itertools.chain([base], (base.with_name(f"{base.name}-{n}") for n in itertools.count(2)))
    if not resume:
        return next(out for out in candidates if _claim(out, cfg))
    newest = base
    for out in candidates:
        if not out.exists():
            return newest
        newest = out


def _resumed_config(out: Path, cfg: TrainConfig, keys: set) -> TrainConfig:
    config_file = RunDir(out).config
    if not config_file.exists():
        raise FileNotFoundError(f"resume: {out} has no {CHECKPOINT} to resume from "
                                "(nor a config.toml: no run was started there)")
    if config_file.stat().st_size == 0:  # claimed, then killed before a byte of config was written
        raise ValueError(f"resume: {config_file} is empty: the run stopped before it wrote its config, "
                         f"so nothing was trained; remove {out} and start the run again")
    saved = load_config(config_file).resolved()
    changed = sorted(k for k in keys if k not in RESUMABLE_OVERRIDES
                     and getattr(saved, k, None) != getattr(cfg, k, None))
    if changed:
        raise ValueError(f"resume: {changed} differ from the saved config in {out}/config.toml; "
                         f"only {sorted(RESUMABLE_OVERRIDES)} may change when resuming")
    for k in RESUMABLE_OVERRIDES & keys:
        setattr(saved, k, getattr(cfg, k))
    return saved


class _Meter:
    def __init__(self):
        self.loss = self.correct = self.seen = self.images = 0.0
        self.seconds = 0.0

    def state(self) -> dict:
        return dict(vars(self))

    def load(self, state: dict) -> None:
        vars(self).update(state)


class _Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, resume: bool, show_progress: bool, d: distributed.Dist):
        from pyens.data import load

        self.cfg, self.out, self.show_progress = cfg, out, show_progress
        self.method = get_method(cfg.method)
        self.dist = d
        self.device = self.dist.device
        data_dir = cfg.data_dir or None
        self.data = load(cfg.dataset, "train", data_dir=data_dir)
        self.eval_data = load(cfg.dataset, "test", data_dir=data_dir)
        self.n = min(len(self.data), cfg.train_size) if cfg.train_size else len(self.data)
        self.batches_per_epoch = math.ceil(self.n / cfg.batch_size)
        self.total_steps = cfg.epochs * self.batches_per_epoch

        torch.manual_seed(cfg.seed)
        self.net = build_network(cfg, self.data).to(self.device)
        self.train_net = distributed.wrap(self.net, self.dist)
        self.optimizer = self._optimizer()
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch, self.batch, self.step, self.perm = 0, 0, 0, None
        self.history: list[dict] = []
        self.meter = _Meter()
        if resume:
            self._load()
            if cfg.max_steps and self.step >= cfg.max_steps:
                raise ValueError(f"max_steps: the run in {out} stopped at its max_steps ({cfg.max_steps}); "
                                 "resume with a larger max_steps, or 0 for no limit")
        elif self.dist.main:
            RunDir(out).metrics.write_text("")
        if self.dist.main:  # on resume: the resumable settings (max_steps, device, ...) as now used
            atomic_write_text(cfg.to_toml(), RunDir(out).config)
        distributed.barrier(self.dist)

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        if cfg.optimizer == "adam":
            return torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self) -> None:
        if not self.dist.main:
            return
        state = {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "epoch": self.epoch, "batch": self.batch, "step": self.step, "perm": self.perm,
                 "rng": checkpoint.rng_state(self.generator), "history": self.history,
                 "meter": self.meter.state(), "config": self.cfg.to_dict()}
        checkpoint.atomic_save(state, RunDir(self.out).checkpoint)

    def _load(self) -> None:
        state = checkpoint.load(RunDir(self.out).checkpoint, map_location=self.device)
        now = self.cfg.to_dict()
        differ = sorted(k for k, v in state.get("config", {}).items() if k not in RESUMABLE_OVERRIDES and now.get(k) != v)
        if differ:
            raise ValueError(f"resume: {RunDir(self.out).checkpoint} was written with other {differ} than "
                             f"{self.out / 'config.toml'} holds; the two belong to different runs")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch, self.step, self.perm = state["epoch"], state["batch"], state["step"], state["perm"]
        self.history = state["history"]
        self.meter.load(state["meter"])
        checkpoint.set_rng_state(state["rng"], self.generator)
        if self.dist.main:  # records after the checkpoint belong to a run that crashed
            atomic_write_text("".join(json.dumps(h) + "\n" for h in self.history),
                                         RunDir(self.out).metrics)

    # -- the loop ------------------------------------------------------------------------------
    def _batches(self):
        """(x, y) on the device for the batches left in this epoch, this rank's shard."""
        cfg = self.cfg
        if self.perm is None:
            self.perm = torch.randperm(self.n, generator=self.generator)
        images = getattr(self.data, "images", None)
        while self.batch < self.batches_per_epoch:
            idx = distributed.shard(self.perm[self.batch * cfg.batch_size:(self.batch + 1) * cfg.batch_size],
                                    self.dist)
            if images is not None:
                x, y = images[idx], self.data.labels[idx]
            else:  # lazily decoded datasets (image folders)
                items = [self.data[int(i)] for i in idx]
                x, y = torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def fit(self) -> TrainResult:
        cfg = self.cfg
        ctx = StepContext(net=self.net, train_net=self.train_net, cfg=cfg, generator=self.generator)
        bar = self._progress()
        last_save = time.monotonic()
        stopped = False
        try:
            while self.epoch < cfg.epochs and not stopped:
                self.net.train()
                for x, y in self._batches():
                    t0 = time.perf_counter()
                    lr = lr_at(cfg.schedule, cfg.lr, self.step, self.total_steps)
                    ctx.progress = (self.step + 0.5) / self.total_steps
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    out = self.method.loss(ctx, x, y)
                    if not torch.isfinite(out.loss):
                        raise FloatingPointError(
                            f"train: the {cfg.method} loss is {out.loss.item()} at epoch {self.epoch}, step "
                            f"{self.step}; lower lr (now {lr:.3g}) or check the data")
                    self.optimizer.zero_grad(set_to_none=True)
                    out.loss.backward()
                    self.optimizer.step()
                    m = self.meter
                    m.loss += out.loss.item() * len(y)
                    m.correct, m.seen, m.images = m.correct + out.correct, m.seen + out.seen, m.images + len(y)
                    m.seconds += time.perf_counter() - t0
                    self.batch += 1
                    self.step += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{m.loss / m.images:.3f}", acc=f"{m.correct / max(m.seen, 1):.3f}",
                                        img_s=f"{m.images * self.dist.world / max(m.seconds, 1e-9):.0f}",
                                        refresh=False)
                    if cfg.max_steps and self.step >= cfg.max_steps:
                        stopped = True
                        break
                    if time.monotonic() - last_save > 60 * cfg.checkpoint_minutes:
                        self._save()
                        last_save = time.monotonic()
                if self.batch >= self.batches_per_epoch:
                    self._end_epoch()
                    last_save = time.monotonic()
            if stopped and self.batch < self.batches_per_epoch:
                self._save()  # a partial epoch (max_steps): resumable from here
        finally:
            if bar is not None:
                bar.close()
        agree = distributed.replicas_agree(self.net, self.dist)
        distributed.barrier(self.dist)
        self.net.eval()
        result = TrainResult(self.net, cfg, self.history, RunDir(self.out).checkpoint, self.out, agree,
                             self.step if stopped and self.step < self.total_steps else None, self.total_steps)
        distributed.teardown(self.dist)
        return result

    def _end_epoch(self) -> None:
        m = self.meter
        record = {"epoch": self.epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                  "train_loss": m.loss / max(m.images, 1), "train_acc": m.correct / max(m.seen, 1),
                  "seconds": m.seconds, "images_per_s": m.images * self.dist.world / max(m.seconds, 1e-9)}
        if self.dist.main:
            record.update(self._diagnostics())
        self.history.append(record)
        self.epoch, self.batch, self.perm = self.epoch + 1, 0, None
        self.meter = _Meter()
        self._save()
        if self.dist.main:
            with open(RunDir(self.out).metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def _clean_accuracy(self, n: int) -> float:
        images = getattr(self.eval_data, "images", None)
        if images is None:
            images = torch.stack([self.eval_data[i][0] for i in range(n)])
            labels = torch.tensor([int(self.eval_data[i][1]) for i in range(n)])
        else:
            images, labels = images[:n], self.eval_data.labels[:n]
        model = classifier(self.net).eval()
        correct = 0
        for i in range(0, n, 500):
            x, y = images[i:i + 500].to(self.device), labels[i:i + 500].to(self.device)
            correct += (model(x).argmax(1) == y).sum().item()
        self.net.train()
        return correct / n

    def _diagnostics(self) -> dict:
        """Per-epoch checks logged to metrics.jsonl: clean accuracy, MAT's cross-gradient ratio and
        steepest-direction disagreement E_p, the members' gradient cosine similarity."""
        n = min(self.cfg.eval_size, len(self.eval_data))
        out = {"eval_clean_acc": self._clean_accuracy(n) if n else None}
        mimo_inputs = None
        if self.method.kind == "mimo" and self.cfg.method != "mimo" and getattr(self.data, "images", None) is not None:
            from pyens.attacks import cross_gradient_ratio
            from pyens.nn import mimo_batch

            # Fig. 1 of the MAT paper: ||cross gradient|| / ||true gradient|| per member, on a
            # fixed batch of training images (the same one every epoch).
            g = torch.Generator().manual_seed(self.cfg.seed)
            x = self.data.images[:128].to(self.device)
            y = self.data.labels[:128].to(self.device)
            xm, ym = mimo_batch(x, y, self.cfg.members, generator=g, repetition=self.cfg.input_repetition)
            self.net.eval()
            out["cross_gradient_ratio"] = [float(r) for r in cross_gradient_ratio(self.net, xm, ym)]
            mimo_inputs = (xm, ym)
            self.net.train()
        if hasattr(self.net, "member") and getattr(self.data, "images", None) is not None:
            from pyens.eval.diagnostics import epoch_diagnostics

            # E_p (MAT App. D, Fig. 4; MIMO only) and per member pair the mean cosine similarity
            # of the input gradients and of their signs (DML Figs. 9-11), on the same fixed batch.
            self.net.eval()
            out.update(epoch_diagnostics(self.net, self.data.images[:128].to(self.device),
                                         self.data.labels[:128].to(self.device), mimo_inputs=mimo_inputs))
            self.net.train()
        return out

    def _progress(self):
        if not (self.show_progress and self.dist.main):
            return None
        from pyens.progress import progress

        # A bar on a terminal; one line every few seconds in a log (CI, `> log`).
        return progress(self.total_steps if not self.cfg.max_steps else min(self.total_steps, self.cfg.max_steps),
                        f"{self.cfg.method} {self.cfg.dataset}", unit="batch", initial=self.step)
