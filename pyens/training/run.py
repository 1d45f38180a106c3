"""A run directory and the networks a config describes.

A run directory holds ``config.toml`` (the resolved config), ``checkpoint.pt`` (written
atomically at each epoch end and every ``checkpoint_minutes``), ``metrics.jsonl`` (one record
per epoch) and, after ``pyens eval``, ``eval.json`` / ``eval.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pyens.training import checkpoint
from pyens.training.config import TrainConfig, load_config
from pyens.training.methods import get_method
from pyens.training.run_dir import RunDir


def build_network(cfg: TrainConfig, data) -> nn.Module:
    """The network ``cfg.method`` trains, for a dataset with ``data``'s shape and classes."""
    return get_method(cfg.method).build(cfg, data)


def counted_networks(net: nn.Module) -> list[nn.Module]:
    """The networks whose passes count in Table 6: each member of a vanilla ensemble."""
    from pyens.nn import Ensemble

    if isinstance(net, Ensemble):
        return [net.member(i) for i in range(net.members)]
    return [net]


class EnsembleScores(nn.Module):
    """``[B, C, H, W] -> [B, K]``: a MIMO or vanilla ensemble as one classifier.

    The scores are ``log`` of the members' averaged softmax (the ensemble's prediction), so
    attacks on this module attack the averaged output.
    """

    def __init__(self, net: nn.Module, average: str = "prob"):
        super().__init__()
        self.net, self.average = net, average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.ensemble(x, average=self.average)


def classifier(net: nn.Module) -> nn.Module:
    """What is evaluated: the model itself, or the ensemble of a MIMO / vanilla ensemble."""
    return EnsembleScores(net) if hasattr(net, "ensemble") else net


@dataclass
class Run:
    """What :func:`load_run` returns; ``model`` is the network, as in :class:`~pyens.training.TrainResult`."""

    out: Path
    config: TrainConfig
    model: nn.Module
    history: list
    epoch: int

    @property
    def net(self) -> nn.Module:
        """The network: the old name of :attr:`model`, kept as an alias."""
        return self.model

    @property
    def classifier(self) -> nn.Module:
        return classifier(self.model)

    def members(self) -> list[nn.Module]:
        """Sub-models (MIMO member views / ensemble models); empty for a single model."""
        if not hasattr(self.model, "member"):
            return []
        return [self.model.member(i) for i in range(self.model.members)]


def load_run(out: str | Path, device: str | torch.device = "auto") -> Run:
    """Rebuild a trained network from a run directory (its ``config.toml`` and checkpoint).

    ``device``: where the network goes, ``"auto"`` (CUDA when visible), ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` or a ``torch.device``. The network is ``.model`` of the returned :class:`Run`.
    """
    from pyens.data import load
    from pyens.training.distributed import resolve_device

    device = resolve_device(device)
    out = Path(out)
    for name in RunDir(out).missing():
        raise FileNotFoundError(f"run_dir: {out} has no {name}; is it a pyens training run?")
    cfg = load_config(RunDir(out).config).resolved()
    data = load(cfg.dataset, "test", data_dir=cfg.data_dir or None)
    net = build_network(cfg, data)
    state = checkpoint.load(RunDir(out).checkpoint)
    net.load_state_dict(state["model"])
    net.to(device).eval()
    return Run(out, cfg, net, state.get("history", []), state.get("epoch", 0))
