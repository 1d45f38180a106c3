"""DistributedDataParallel under ``torchrun`` with no change to user code.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; when they say more than one
process, :func:`setup` joins the process group (gloo on the CPU, nccl on GPUs), each rank
trains on its slice of every global batch, and DDP averages the gradients. Attacks run on
the bare network, so only the training backward synchronises.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str | torch.device, arg: str = "device") -> torch.device:
    """``"auto"`` (CUDA if visible, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
    ``torch.device`` (returned as it is); errors name ``arg``."""
    if isinstance(name, torch.device):
        if name.type == "meta":
            raise ValueError(f"{arg}: the meta device holds no data, got {name}")
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{arg} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from exc
    if device.type == "meta":
        raise ValueError(f"{arg}: the meta device holds no data, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{arg}: {name!r} was asked for but no CUDA device is visible")
    return device


def setup(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return Dist(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, device=device)


def broadcast_object(obj, d: Dist):
    """Rank 0's ``obj`` on every rank (picklable; ``obj`` of the other ranks is ignored)."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=d.device if d.device.type == "cuda" else None)
    return box[0]


def wrap(net: nn.Module, d: Dist) -> nn.Module:
    if not d.active:
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def shard(idx: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's examples of a global batch (interleaved, so shards differ by at most one)."""
    return idx[d.rank::d.world] if d.active else idx


def replicas_agree(net: nn.Module, d: Dist) -> bool:
    """Whether every rank holds the same parameters (a float64 checksum per rank)."""
    if not d.active:
        return True
    with torch.no_grad():
        s = torch.stack([torch.cat([p.detach().double().flatten() for p in net.parameters()]).sum(),
                         torch.cat([p.detach().double().flatten().abs() for p in net.parameters()]).sum()])
    s = s.to(d.device)
    gathered = [torch.empty_like(s) for _ in range(d.world)]
    dist.all_gather(gathered, s)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
