"""The ``pyens`` command (also ``python -m pyens``).

  pyens train   train a model (no arguments: MAT on the embedded MNIST, then its robustness table)
  pyens eval    evaluate trained runs: clean accuracy, PGD linf/l2/l1 (or the attack catalogue), unions (Table 4)
  pyens report  evaluate runs and write a Markdown report: Table 4, transfer tables, curves, sanity checks
  pyens dml-report  DML paper tables (2, 4-9), detection, certified accuracy, masking check
  pyens info    versions, build flags, devices and the backend every op would use
  pyens demo    a short MAT-style PGD run of the fused step on every usable backend
  pyens convert-checkpoint  rewrite a checkpoint of an earlier pyens version in the safe format (--trust)
"""
from __future__ import annotations

import argparse
import os
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


def _csv(cast):
    return lambda text: tuple(cast(v) for v in text.split(",") if v)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


DEFAULT_CONFIG = "quick-mnist"  # `pyens train` with no arguments: the main job

# `pyens train` flags -> TrainConfig fields; None means "keep the config's value".
_TRAIN_FLAGS = {
    "method": str, "dataset": str, "data_dir": str, "model": str, "members": int, "norms": _csv(str),
    "eps": _csv(float), "alpha": _csv(float), "steps": int, "k": int, "outer": str, "epochs": int,
    "batch_size": int, "optimizer": str, "lr": float, "weight_decay": float, "schedule": str,
    "train_size": int, "seed": int, "device": str, "out": str, "max_steps": int, "eps_warmup": float,
    "input_repetition": float, "msd_select": str, "k_range": _csv(int), "random_start": _bool,
}


def _check_eval_flags(args: argparse.Namespace):
    """The evaluation flags, checked before any training starts; returns the eval device."""
    from pyens.training.distributed import resolve_device

    for flag in ("eval_n", "eval_steps", "eval_restarts", "eval_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return resolve_device(args.eval_device or "auto", "--eval-device")


def cmd_train(args: argparse.Namespace) -> int:
    from pyens.training import train

    if not args.no_eval:
        _check_eval_flags(args)
    overrides = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    # --resume reads the run's own config; a --config given with it must match that.
    config = args.config or (None if args.resume else DEFAULT_CONFIG)
    result = train(config=config, resume=args.resume, progress=not args.no_progress, **overrides)
    print(f"run saved in {result.out} (checkpoint {result.checkpoint.name}, metrics.jsonl, config.toml)")
    if result.history:
        last = result.history[-1]
        clean = last.get("eval_clean_acc")
        print(f"epoch {last['epoch']}: train loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, "
              f"clean test acc {float('nan') if clean is None else clean:.3f}, {last['images_per_s']:.0f} img/s")
    if not result.replicas_agree:
        print("error: the DDP replicas ended with different parameters", file=sys.stderr)
        return 1
    if args.no_eval or int(os.environ.get("RANK", "0")) != 0:
        return 0
    return _evaluate_runs([result.out], args)


def cmd_eval(args: argparse.Namespace) -> int:
    return _evaluate_runs(args.run_dirs, args)


def _evaluate_runs(run_dirs, args: argparse.Namespace) -> int:
    from pathlib import Path

    from pyens.eval import catalogue, format_table, pgd_specs
    from pyens.eval.catalogue import APGD_KEYS
    from pyens.eval.reporting import evaluate_run
    from pyens.training.checkpoint import atomic_write_text

    device = _check_eval_flags(args)
    if args.attacks in ("pgd", "pgd+apgd"):
        def specs(dataset):
            out = pgd_specs(dataset, steps=args.eval_steps, restarts=args.eval_restarts)
            return out + (catalogue(args.attacks, dataset, only=APGD_KEYS) if args.attacks == "pgd+apgd" else [])
    else:
        specs = lambda dataset: catalogue(args.attacks, dataset)  # noqa: E731
    reports = []
    for run_dir in run_dirs:
        report = evaluate_run(run_dir, attacks=specs, n=args.eval_n, batch_size=args.eval_batch_size, device=device,
                              progress=not args.no_progress)
        report.to_json(Path(run_dir) / "eval.json")
        atomic_write_text(report.to_markdown(), Path(run_dir) / "eval.md")
        reports.append(report)
    n = reports[0].n
    what = {"pgd": f"PGD at the paper's radii, {args.eval_steps} steps",
            "pgd+apgd": f"PGD at the paper's radii ({args.eval_steps} steps) and AutoAttack's APGD-CE and "
                        "APGD-T (100 steps, torchattacks) for linf and l2"}.get(args.attacks,
                                                                                 f"the {args.attacks!r} attack catalogue")
    print(f"\nrobust accuracy (%) on the first {n} test images, {what} (Table 4 layout):")
    print(format_table(reports))
    for run_dir, report in zip(run_dirs, reports):
        print(f"{report.model} = {_trained(run_dir)}")
    if args.markdown:
        Path(args.markdown).write_text(format_table(reports, markdown=True))
        print(f"markdown table written to {args.markdown}")
    return 0


def _trained(run_dir) -> str:
    """What the run in ``run_dir`` trained, in one line (its config's method and settings)."""
    from pathlib import Path

    from pyens.training import load_config
    from pyens.training.methods import describe

    try:
        return describe(load_config(Path(run_dir) / "config.toml").resolved())
    except (OSError, ValueError, KeyError) as exc:  # an old or foreign config: the table still stands
        return f"(config unreadable: {exc})"


def cmd_report(args: argparse.Namespace) -> int:
    import shlex

    from pyens.eval.reporting import Settings, report_runs
    from pyens.training.distributed import resolve_device

    params, subsets = {}, {}
    for item in args.set or []:  # attack.param=value
        key, _, value = item.partition("=")
        attack, _, param = key.partition(".")
        if not (attack and param and value):
            raise ValueError(f"--set: expected ATTACK.PARAM=VALUE, got {item!r}")
        params.setdefault(attack, {})[param] = _literal(value)
    for item in args.subset or []:  # attack=n
        attack, _, value = item.partition("=")
        if not (attack and value.isdigit()):
            raise ValueError(f"--subset: expected ATTACK=N, got {item!r}")
        subsets[attack] = int(value)
    settings = Settings(preset=args.attacks, n=args.n, batch_size=args.batch_size,
                        device=str(resolve_device(args.device or "auto", "--device")), curves_n=args.curves_n,
                        transfer_n=args.transfer_n, only=args.only.split(",") if args.only else None,
                        params=params, subsets=subsets, curves=not args.no_curves, transfer=not args.no_transfer,
                        progress=not args.no_progress)
    command = "pyens " + " ".join(shlex.quote(a) for a in args.argv)
    path = report_runs(args.run_dirs, args.out, settings, title=args.title, command=command)
    print(f"report written to {path}")
    return 0


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def cmd_dml_report(args: argparse.Namespace) -> int:
    from pyens.eval.dml import TABLES, run_dml_report
    from pyens.training.distributed import resolve_device

    tables = TABLES if args.tables == "all" else tuple(t for t in args.tables.split(",") if t)
    run_dml_report(args.run_dirs, tables=tables, n=args.n, budget=args.budget, out=args.out,
                   device=resolve_device(args.device or "auto", "--device"), progress=not args.no_progress, merge=args.merge)
    return 0


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    """Checkpoints load with weights_only=True; this converts older ones, the only full unpickle."""
    from pyens.training.checkpoint import convert

    backup = convert(args.run, trust=args.trust)
    if backup is None:
        print(f"{args.run}: the checkpoint already loads safely (weights only); nothing to convert")
    else:
        print(f"{args.run}: checkpoint converted to the safe format; the original is kept as {backup}")
    return 0


def _eval_flags(p: argparse.ArgumentParser, *, attacks: str = "pgd", n: int = 1000) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-n", type=int, default=n, help=f"test images (default {n}; the papers use the first 1000)")
    g.add_argument("--eval-steps", type=int, default=50, help="PGD steps per attack")
    g.add_argument("--eval-restarts", type=int, default=1,
                   help="PGD runs per attack; above 1 each starts at a random point of the ball")
    g.add_argument("--eval-batch-size", type=int, default=500)
    g.add_argument("--eval-device", default=None, help="default: auto")
    g.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    g.add_argument("--attacks", default=attacks, choices=("pgd", "pgd+apgd", "quick", "paper"),
                   help=f"pgd: PGD linf/l2/l1 (--eval-steps, --eval-restarts); pgd+apgd: also APGD-CE and APGD-T "
                        f"for linf and l2; quick/paper: the attack catalogue (default: {attacks})")


def _methods_help() -> str:
    """One line per training method: what ``--method NAME`` trains."""
    from pyens.training import METHODS

    width = max(map(len, METHODS))
    lines = [f"  {name:{width}s}  {METHODS[name].doc}" for name in sorted(METHODS)]
    return "methods (--method):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyens", description="Robust ensembles (MAT, DML) with fused kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, build flags, devices and active backends")
    info.add_argument("-v", "--verbose", action="store_true", help="also say why the other backends are not used")
    info.set_defaults(func=cmd_info)
    tr = sub.add_parser("train", help="train MAT or a baseline (no arguments: the quick MNIST MAT run)",
                        description="Train, then evaluate. Flags override the config (default: quick-mnist).",
                        epilog=_methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--config", default=None,
                    help=f"a TOML file or a shipped config name (default: {DEFAULT_CONFIG}; with --resume: the run's)")
    for flag, cast in _TRAIN_FLAGS.items():
        tr.add_argument("--" + flag.replace("_", "-"), dest=flag, type=cast, default=None)
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    tr.add_argument("--no-eval", action="store_true", help="skip the robustness table after training")
    tr.add_argument("--no-progress", action="store_true")
    # The main job's table: APGD beside PGD (PGD alone overstates robustness), on 500 images so
    # that training and table together stay within minutes on 2 CPU cores.
    _eval_flags(tr, attacks="pgd+apgd", n=500)
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="robustness table (Table 4 layout) of trained runs")
    ev.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    ev.add_argument("--no-progress", action="store_true")
    _eval_flags(ev, attacks="pgd+apgd")
    ev.set_defaults(func=cmd_eval)
    rp = sub.add_parser("report", help="evaluate runs and write a Markdown report with tables and plots",
                        description="Table 4 (every catalogue attack), transferability (Tables 1-3, 9-12), curves, "
                                    "diagnostics and sanity checks of trained runs (or of saved evaluations), as "
                                    "OUT/report.md with PNGs beside it. Measurements are cached under OUT/data.")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", default="report", help="output folder (default: ./report)")
    rp.add_argument("--title", default=None)
    rp.add_argument("--attacks", default="quick", choices=("quick", "paper", "pgd", "pgd+apgd"), help="catalogue preset")
    rp.add_argument("--only", default=None, help="comma-separated catalogue keys (default: all of the preset)")
    rp.add_argument("--set", action="append", metavar="ATTACK.PARAM=VALUE", help="override a preset parameter")
    rp.add_argument("--subset", action="append", metavar="ATTACK=N", help="run ATTACK on the first N examples only")
    rp.add_argument("--n", type=int, default=1000, help="test images (the papers use the first 1000)")
    rp.add_argument("--curves-n", type=int, default=200, help="test images for the curves")
    rp.add_argument("--transfer-n", type=int, default=None, help="test images for the transfer tables (default: --n)")
    rp.add_argument("--no-curves", action="store_true")
    rp.add_argument("--no-transfer", action="store_true")
    rp.add_argument("--batch-size", type=int, default=250)
    rp.add_argument("--device", default=None, help="default: auto")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=cmd_report)
    dr = sub.add_parser("dml-report", help="the DML paper's tables for DML and baseline ensemble runs",
                        description="Tables 2, 4, 5, 6/9, 7, certified accuracy, detection, the distortion-accuracy "
                                    "curve and a gradient-masking check, as dml_report.{json,md} and dml_curve.png.")
    dr.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="ensemble runs (dml, dml_at, ensemble, ...)")
    dr.add_argument("--tables", default="all", help="comma-separated: table2,transfer,curve,surrogates,table5,"
                                                    "table6,autoattack,certified,detection (default: all)")
    dr.add_argument("--n", type=int, default=1000, help="test images (the paper: the first 1000)")
    dr.add_argument("--budget", default="quick", choices=("quick", "paper"), help="attack budget (pyens.eval.dml)")
    dr.add_argument("--out", default=None, help="output folder (default: the first RUN_DIR)")
    dr.add_argument("--merge", action="store_true", help="add the tables to an existing dml_report.json")
    dr.add_argument("--device", default=None, help="default: auto")
    dr.add_argument("--no-progress", action="store_true")
    dr.set_defaults(func=cmd_dml_report)
    cc = sub.add_parser("convert-checkpoint", help="rewrite a checkpoint of an earlier pyens version in the "
                                                   "safe format (needs --trust)",
                        description="Checkpoints load with torch.load(weights_only=True), which runs no code. "
                                    "Ones written by earlier pyens versions hold NumPy objects and need a full "
                                    "unpickle, which runs whatever the file holds: with --trust this does that "
                                    "once, rewrites the checkpoint with tensors and plain values, and keeps the "
                                    "original as checkpoint.pt.orig.")
    cc.add_argument("run", metavar="RUN", help="a run directory or a checkpoint file")
    cc.add_argument("--trust", action="store_true",
                    help="you trust the file: unpickling it fully runs any code it holds")
    cc.set_defaults(func=cmd_convert_checkpoint)
    demo = sub.add_parser("demo", help="run MAT's fused inner PGD step on every usable backend")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--batch", type=int, default=128)
    demo.add_argument("--steps", type=int, default=100)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Bad input is the user's to fix: say what, without a traceback.
        print(f"pyens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyens {args.command}: interrupted; a training run resumes from its last checkpoint "
              "with --resume --out RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
