"""The ``pyens`` command (also ``python -m pyens``).

  pyens info    versions, build flags, devices and the backend every op would use
  pyens demo    a short MAT-style PGD run of the fused step on every usable backend
"""
from __future__ import annotations

import argparse
import platform
import sys
import time


def _versions() -> dict[str, str]:
    import numpy
    import torch

    import pyens

    out = {"pyens": pyens.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": numpy.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report any broken install, never fail
        out["triton"] = f"unavailable ({exc.__class__.__name__})"
    return out


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from pyens.ops import backends, build_info
    from pyens.ops._backend import _compiled

    print("versions:")
    for k, v in _versions().items():
        print(f"  {k:10s} {v}")
    print("build (pyens._C):")
    mod, why = _compiled()
    if mod is None:
        print(f"  not available: {why}")
    else:
        for k, v in build_info().items():
            print(f"  {k:14s} {v}")
        backend = mod.parallel_info().strip().splitlines()[-1]  # "ATen parallel backend: OpenMP"
        print(f"  {'cpu threads':14s} {torch.get_num_threads()} ({backend})")
    print("devices:")
    print(f"  cpu   {platform.processor() or platform.machine()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        print("  cuda  none visible")
    print("backends (float32):")
    for op, per_device in backends().items():
        for device, rep in per_device.items():
            print(f"  {op:20s} {device:5s} -> {rep['selected'] or '(none)'}")
            if args.verbose:
                for b, reason in rep["why_not"].items():
                    print(f"  {'':20s} {'':5s}    {b}: {reason}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """MAT's inner maximisation on random data: M = 3 members (l1, l2, linf), one launch a step."""
    import torch

    from pyens.ops import available_backends, lp_step, use_backend

    torch.manual_seed(0)
    device = torch.device(args.device)
    b, n = args.batch, 784
    norms, eps, alpha = ("l1", "l2", "linf"), (10.0, 2.0, 0.3), (0.8, 0.1, 0.01)  # MNIST, Appendix C
    x = torch.rand(b, 3, n, device=device)
    w = torch.randn(3, n, device=device)  # a fixed linear "loss" whose input gradient is w
    print(f"MAT inner step, B={b}, M=3 {norms}, n={n}, {args.steps} steps, device {device}")
    print(f"{'backend':10s} {'ms/step':>8s} {'l1':>8s} {'l2':>8s} {'linf':>8s}   (mean norm of each member's delta)")
    for backend in available_backends("lp_step", device):
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter is a correctness tool, not a demo
        delta = torch.zeros_like(x)
        grad = w.expand_as(x) + 0.1 * torch.randn_like(x)
        with use_backend(backend):
            start = time.perf_counter()
            for _ in range(args.steps):
                delta = lp_step(delta, grad, x, norm=norms, eps=eps, alpha=alpha, k=20)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / args.steps * 1e3
        l1 = delta[:, 0].abs().sum(-1).mean().item()
        l2 = delta[:, 1].norm(dim=-1).mean().item()
        li = delta[:, 2].abs().amax(-1).mean().item()
        print(f"{backend:10s} {ms:8.3f} {l1:8.3f} {l2:8.3f} {li:8.3f}")
    print("every member ends on its own ball: l1 <= 10, l2 <= 2, linf <= 0.3, and x + delta in [0, 1]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyens", description="Robust ensembles (MAT, DML) with fused kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, build flags, devices and active backends")
    info.add_argument("-v", "--verbose", action="store_true", help="also say why the other backends are not used")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="run MAT's fused inner PGD step on every usable backend")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--batch", type=int, default=128)
    demo.add_argument("--steps", type=int, default=100)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
