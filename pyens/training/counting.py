"""Count forward and backward passes in batch-equivalents (MAT paper, Table 6).

A pass of one network over ``m * B`` examples counts ``m``: a MIMO network's pass over
``[B, M, ...]`` counts 1 (its M inputs share one pass), a vanilla ensemble's pass counts one
per member network, and a single model's pass over M stacked adversarial batches counts M.
Backward passes are counted where the gradient enters the network's output, so every
``backward()`` and every ``torch.autograd.grad`` through the network counts, whether it asks
for parameter or input gradients.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn


@dataclass
class PassCount:
    batch_size: int
    forward: float = 0.0
    backward: float = 0.0
    _handles: list = field(default_factory=list, repr=False)

    def reset(self) -> None:
        self.forward = self.backward = 0.0

    def as_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward}


@contextmanager
def count_passes(networks: nn.Module | list[nn.Module], batch_size: int):
    """Count passes through ``networks`` while the context is open.

    Args:
        networks: the network(s) whose passes count: the model for single models and MIMO,
            each member model for a vanilla ensemble.
        batch_size: B, the unit of a batch-equivalent.

    Yields:
        A :class:`PassCount` updated in place.
    """
    nets = [networks] if isinstance(networks, nn.Module) else list(networks)
    count = PassCount(batch_size)

    def on_forward(module, args, output):
        n = output.shape[0] / batch_size  # rows the network processed, in batches
        count.forward += n
        if output.requires_grad:
            def on_backward(grad):
                count.backward += n
            output.register_hook(on_backward)

    handles = [net.register_forward_hook(on_forward) for net in nets]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()

