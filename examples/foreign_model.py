"""A model trained outside pyens, then evaluated by it (README: "Evaluate your own model").

A small CNN that, like most models in the wild, expects normalised inputs, trained for a short
while with plain PyTorch on the embedded MNIST training split (pyens only supplies the data):

    OMP_NUM_THREADS=1 python examples/foreign_model.py --out cnn.pt
    pyens eval --model examples.foreign_model:build --weights cnn.pt --normalize mnist \\
        --attacks quick --n 100

``build`` is the factory ``pyens eval --model`` imports; ``--normalize mnist`` puts the
normalisation the CNN was trained with in front of it, so that attacks work on pixels in [0, 1].
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

MEAN, STD = 0.1307, 0.3081  # MNIST's pixel statistics: the CNN sees (x - MEAN) / STD


def build(width: int = 16) -> nn.Module:
    """The CNN: normalised MNIST ``[B, 1, 28, 28]`` -> logits ``[B, 10]``."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="cnn.pt", help="state dict file (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    p.add_argument("--width", type=int, default=16, help="channels of the first convolution (default: %(default)s)")
    args = p.parse_args()

    from pyens.data import load  # the embedded MNIST: no download

    torch.manual_seed(0)
    train, test = load("mnist", "train"), load("mnist", "test")
    model = build(args.width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for step in range(args.steps):
        i = torch.randint(0, len(train), (64,))
        loss = nn.functional.cross_entropy(model((train.images[i] - MEAN) / STD), train.labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model((test.images - MEAN) / STD).argmax(1) == test.labels).float().mean().item()
    torch.save(model.state_dict(), args.out)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s; clean accuracy {100 * acc:.1f}% on the "
          f"{len(test)} test images; state dict saved to {args.out}")


if __name__ == "__main__":
    main()
