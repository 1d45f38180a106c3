"""The ``pyens`` command (also ``python -m pyens``).

  pyens train   train a model (no arguments: MAT on the embedded MNIST, then its robustness table)
  pyens eval    evaluate trained runs: clean accuracy, PGD linf/l2/l1 (or the attack catalogue), unions (Table 4)
  pyens report  evaluate runs and write a Markdown report: Table 4, transfer tables, curves, sanity checks
  pyens dml-report  DML paper tables (2, 4-9), detection, certified accuracy, masking check
  pyens info    versions, build flags, devices and the backend every op would use
  pyens selftest  every op on every available backend against the float64 reference
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
    from pyens.ops.dispatch import compiled_extension

    print("versions:")
    for k, v in _versions().items():
        print(f"  {k:10s} {v}")
    print("build (pyens._C):")
    mod, why = compiled_extension()
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
    print("self-check on first use (pyens selftest; PYENS_SELFTEST=0 turns it off):")
    for op, per_device in backends().items():
        for device, rep in per_device.items():
            for b, state in rep["self_check"].items():
                print(f"  {op:20s} {device:5s} {b:9s} {state}")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from pyens.ops import selftest

    start = time.perf_counter()
    results = selftest.run(args.device, backend=args.backend, quick=args.quick)
    if not results:
        print(f"pyens selftest: no backend but the reference runs on {args.device} (pyens info -v says why)")
        return 0
    print(selftest.format_table(results))
    failed = sum(not r.ok for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed in {time.perf_counter() - start:.1f} s "
          f"({args.device}{', quick subset' if args.quick else ''})")
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """MAT's inner maximisation on random data: M = 3 members (l1, l2, linf), one launch a step."""
    import torch

    from pyens.ops import available_backends, lp_step, use_backend

    torch.manual_seed(0)
    from pyens.training.distributed import resolve_device

    device = resolve_device(args.device, "--device")
    b, n = args.batch, 784
    from pyens.papers import MEMBER_NORMS as norms, PAPER_ALPHA, PAPER_EPS

    eps, alpha = (tuple(t["mnist"][p] for p in norms) for t in (PAPER_EPS, PAPER_ALPHA))  # MNIST, Appendix C
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
                delta = lp_step(delta, grad, x, norm=norms, eps=eps, alpha=alpha, k=20, members=3)
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


def per_norm_arg(text: str):
    """``--eps``/``--alpha``: ``linf=0.3,l2=2,l1=10`` (a ``{norm: value}`` table, as in the config
    files) or a bare list ``0.3,2,10`` (one value per member, in the order of the norms); a
    value may be a fraction, ``linf=8/255``."""
    from pyens.eval.threats import parse_number
    from pyens.training.config import NORMS

    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected linf=V,l2=V,l1=V or one value per member")
    try:
        if any("=" in v for v in items):
            table = {}
            for item in items:
                norm, sep, value = item.partition("=")
                norm = norm.strip()
                if not sep or norm not in NORMS:
                    raise argparse.ArgumentTypeError(f"expected NORM=VALUE with NORM one of {', '.join(NORMS)}, "
                                                     f"got {item!r} (e.g. linf=0.3,l2=2,l1=10)")
                if norm in table:
                    raise argparse.ArgumentTypeError(f"{norm} given twice in {text!r}")
                table[norm] = parse_number(value)
            return table
        return tuple(parse_number(v) for v in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers or fractions, e.g. linf=8/255,l2=0.5,l1=12 or 0.3; "
                                         f"got {text!r}") from None


def eps_table_arg(value, flag: str = "--eps") -> dict | None:
    """``pyens eval``'s ``--eps``/``--alpha``: ``{norm: value}`` (a bare list names no norm)."""
    if value is None or isinstance(value, dict):
        return value
    raise ValueError(f"{flag} for pyens eval: give NORM=VALUE pairs, e.g. linf=8/255,l2=0.5,l1=12 (got a bare list)")


def _bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


DEFAULT_CONFIG = "quick-mnist"  # `pyens train` with no arguments: the main job

# `pyens train` flags -> TrainConfig fields; None means "keep the config's value".
_PER_NORM_HELP = ("as NORM=VALUE per norm ({example}; norms not named keep the config's value), or a "
                  "bare list with one value per member in the order of --norms; one number alone only when every "
                  "member has the same norm")


_CASTS = {"str": str, "int": int, "float": float, "bool": _bool, "csv_str": _csv(str), "csv_int": _csv(int),
          "per_norm": per_norm_arg}


def _train_flags() -> dict[str, tuple]:
    """``pyens train``'s flags, from TrainConfig's fields: ``{field: (cast, help)}``. The help
    text is the field's (its ``{placeholders}`` filled with the current choices)."""
    from pyens.nn.backbones import BACKBONES
    from pyens.training import METHODS
    from pyens.training import config as c

    choices = dict(
        methods=", ".join(sorted(METHODS)), datasets=", ".join(c.PAPER_EPS), backbones=", ".join(BACKBONES),
        outer_losses=", ".join(c.OUTER_LOSSES), optimizers=", ".join(c.OPTIMIZERS), schedules=", ".join(c.SCHEDULES),
        msd_selects=", ".join(c.MSD_SELECTS), devices=c.DEVICES_HINT,
        per_norm_eps=_PER_NORM_HELP.format(example="linf=0.3,l2=2,l1=10"),
        per_norm_alpha=_PER_NORM_HELP.format(example="linf=0.01,l2=0.1,l1=0.8"))
    return {f.name: (_CASTS[f.metadata["cli"]], f.metadata["help"].format(**choices)) for f in c.cli_fields()}


def _shown(value) -> str:
    """A config value as it would be typed on the command line."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" for k, v in value.items()) or "empty"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "empty"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if value != "" else "empty"


def _config_defaults() -> dict:
    """The values ``pyens train`` uses when a flag is not given: the default config's."""
    from pyens.training import TrainConfig, load_config

    try:
        return load_config(DEFAULT_CONFIG).to_dict()
    except (OSError, ValueError):  # the help never fails
        return TrainConfig().to_dict()


def check_eval_flags(args: argparse.Namespace):
    """The evaluation flags, checked before any training starts; returns the eval device."""
    from pyens.eval.catalogue import PGD_PRESETS
    from pyens.training.distributed import resolve_device

    flag = lambda name: f"--{args.eval_prefix}{name}"  # noqa: E731 - as this subcommand spells it
    for name, dest in (("n", "eval_n"), ("steps", "eval_steps"), ("restarts", "eval_restarts"),
                       ("batch-size", "eval_batch_size")):
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise ValueError(f"{flag(name)} must be >= 1, got {value}")
    if args.attacks not in PGD_PRESETS:
        for name, dest in (("steps", "eval_steps"), ("restarts", "eval_restarts")):
            if getattr(args, dest) is not None:
                raise ValueError(f"{flag(name)} sets PGD's steps in --attacks {' and '.join(PGD_PRESETS)}; the "
                                 f"{args.attacks!r} preset has its own (pyens report --set changes them)")
    return resolve_device(args.eval_device or "auto", flag("device"))


def _rank() -> int:
    """This process's rank under torchrun (0 without it): only rank 0 prints."""
    return int(os.environ.get("RANK", "0"))


def cmd_train(args: argparse.Namespace) -> int:
    from pyens.training import train

    if not args.no_eval:
        check_eval_flags(args)
    overrides = {k: getattr(args, k) for k in _train_flags() if getattr(args, k) is not None}
    # --resume reads the run's own config; a --config given with it must match that.
    config = args.config or (None if args.resume else DEFAULT_CONFIG)
    result = train(config=config, resume=args.resume, progress=not args.no_progress, **overrides)
    if _rank() != 0:  # under torchrun every rank trains; rank 0 reports and evaluates
        return 0 if result.replicas_agree else 1
    print(f"run saved in {result.out} (checkpoint {result.checkpoint.name}, metrics.jsonl, config.toml)")
    if result.history:
        last = result.history[-1]
        clean = last.get("eval_clean_acc")
        print(f"epoch {last['epoch']}: train loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, "
              f"clean test acc {float('nan') if clean is None else clean:.3f}, {last['images_per_s']:.0f} img/s")
    if result.stopped_at is not None:
        cfg = result.config
        per_epoch = -(-result.total_steps // cfg.epochs) if result.total_steps else 0
        where = f", in epoch {result.stopped_at // per_epoch + 1} of {cfg.epochs}" if per_epoch else ""
        print(f"training stopped early at step {result.stopped_at} of {result.total_steps} (max_steps "
              f"{cfg.max_steps}){where}; continue it with: pyens train --resume --out {result.out} "
              "--max-steps 0")
    if not result.replicas_agree:
        print("error: the DDP replicas ended with different parameters", file=sys.stderr)
        return 1
    if args.no_eval:
        return 0
    return _evaluate_runs([result.out], args)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.list_threats:
        from pyens.eval.threats import list_threats

        print(list_threats())
        return 0
    if args.model:
        if args.run_dirs:
            raise ValueError(f"give RUN_DIRs or --model, not both (got {' '.join(args.run_dirs)} and --model)")
        from pyens.cli_eval import evaluate_model

        return evaluate_model(args)
    if not args.run_dirs:
        raise ValueError("nothing to evaluate: give RUN_DIRs (pyens training runs) or --model (see pyens eval -h)")
    for flag, dest in (("--weights", "weights"), ("--model-arg", "model_arg"), ("--normalize", "normalize"),
                       ("--autocast", "autocast"), ("--resize", "resize"), ("--out", "out")):
        if getattr(args, dest):
            raise ValueError(f"{flag} goes with --model; a training run's own config sets it")
    return _evaluate_runs(args.run_dirs, args)


def _evaluate_runs(run_dirs, args: argparse.Namespace) -> int:
    from pathlib import Path

    from pyens.eval import format_table
    from pyens.eval.catalogue import preset_attacks
    from pyens.eval.run_report import evaluate_run
    from pyens.atomic_files import atomic_write_text
    from pyens.training.run_dir import RunDir

    device = check_eval_flags(args)
    threat, eps, alpha = (getattr(args, k, None) for k in ("threat", "eps", "alpha"))

    def specs(dataset):
        if threat or eps or alpha:  # `pyens eval --threat/--eps/--alpha`: the threat model's attacks
            from pyens.eval.threats import threat_model, threat_specs

            return threat_specs(args.attacks, threat_model(threat, eps_table_arg(eps), dataset), dataset,
                                steps=args.eval_steps, restarts=args.eval_restarts, alpha=eps_table_arg(alpha, "--alpha"))
        # The same function builds pyens.evaluate(attacks=PRESET)'s attacks: the two agree.
        return preset_attacks(args.attacks, dataset, steps=args.eval_steps, restarts=args.eval_restarts)

    steps = args.eval_steps or 50
    reports = []
    for run_dir in run_dirs:
        report = evaluate_run(run_dir, attacks=specs, n=args.eval_n, batch_size=args.eval_batch_size, device=device,
                              progress=not args.no_progress)
        report.meta["threat"] = {a.norm: a.eps for a in report.attacks if a.norm is not None}
        report.meta["threat_preset"] = threat
        report.to_json(RunDir(run_dir).eval_json)
        atomic_write_text(report.to_markdown(), RunDir(run_dir).eval_md)
        reports.append(report)
    if getattr(args, "summary", False):  # one JSON line per model, nothing else on stdout
        import json

        from pyens.eval.foreign import summary
        from pyens.eval.sanity import run_checks

        for report in reports:
            print(json.dumps(summary(report, run_checks(report))))
        return 0
    n = reports[0].n
    radii = "the paper's radii" if not (threat or eps) else \
        "radii " + ", ".join(f"{p} {e:g}" for p, e in reports[0].meta["threat"].items())
    what = {"pgd": f"PGD at {radii}, {steps} steps",
            "pgd+apgd": f"PGD at {radii} ({steps} steps) and AutoAttack's APGD-CE and "
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
    from pyens.training import load_config
    from pyens.training.method_base import describe
    from pyens.training.run_dir import RunDir

    try:
        return describe(load_config(RunDir(run_dir).config).resolved())
    except (OSError, ValueError, KeyError) as exc:  # an old or foreign config: the table still stands
        return f"(config unreadable: {exc})"


def cmd_report(args: argparse.Namespace) -> int:
    import shlex

    from pyens.eval.run_report import Settings, report_runs
    from pyens.training.distributed import resolve_device

    params, subsets = {}, {}
    for item in args.set or []:  # attack.param=value
        key, _, value = item.partition("=")
        attack, _, param = key.partition(".")
        if not (attack and param and value):
            raise ValueError(f"--set: expected ATTACK.PARAM=VALUE, got {item!r}")
        params.setdefault(attack, {})[param] = literal_arg(value)
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


def literal_arg(text: str):
    """A ``KEY=VALUE`` flag's value: a Python literal (``3``, ``0.5``, ``(1, 2)``, ``True``) when
    it parses as one, parsed without evaluating code; else the text itself."""
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


class _Deprecated(argparse.Action):
    """An old spelling of a flag: still works, says which to use instead."""

    def __init__(self, option_strings, dest, use: str = "", **kwargs):
        kwargs.setdefault("help", f"deprecated spelling of {use}")
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)
        self.use = use

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, values)


# The evaluation flags: `pyens eval` spells them as `pyens report` does (--n, --batch-size, ...);
# `pyens train`, where --steps, --batch-size and --device set training, prefixes them with --eval-.
_EVAL_FLAGS = (  # (name, dest, type, default, help)
    ("n", "eval_n", int, None, "test images evaluated, the first N of the test split (count; the papers use 1000)"),
    ("steps", "eval_steps", int, None, "PGD steps per attack (count; --attacks pgd and pgd+apgd only; the step "
                                       "size follows) (default: 50)"),
    ("restarts", "eval_restarts", int, None,
     "PGD runs per attack (count; --attacks pgd and pgd+apgd only); above 1 each starts at a random point of "
     "the ball (default: 1)"),
    ("batch-size", "eval_batch_size", int, 500, "test images per attack batch (count)"),
    ("device", "eval_device", str, "auto", "where the evaluation runs: 'auto', 'cpu', 'cuda' or 'cuda:N'"),
)


def _eval_flags(p: argparse.ArgumentParser, *, attacks: str = "pgd", n: int = 1000, prefix: str = "eval-") -> None:
    """The evaluation flags, named ``--{prefix}n`` etc.; with no prefix, ``--eval-*`` stay as deprecated aliases."""
    p.set_defaults(eval_prefix=prefix)  # errors name the flags as this subcommand spells them
    g = p.add_argument_group("evaluation")
    for name, dest, cast, default, text in _EVAL_FLAGS:
        default = n if dest == "eval_n" else default
        g.add_argument(f"--{prefix}{name}", dest=dest, type=cast, default=default,
                       metavar=name.upper().replace("-", "_"),
                       help=text + (" (default: %(default)s)" if default is not None else ""))
    g.add_argument("--markdown", default=None, metavar="FILE",
                   help="also write the table to this Markdown file (default: none)")
    g.add_argument("--attacks", default=attacks, choices=("pgd", "pgd+apgd", "quick", "paper", "autoattack"),
                   help=f"pgd: PGD linf/l2/l1 at the paper's radii (--{prefix}steps, --{prefix}restarts); pgd+apgd: "
                        "also AutoAttack's APGD-CE and APGD-T for linf and l2; quick/paper: the whole attack "
                        "catalogue, cut to CPU size or at the papers' settings; autoattack: AutoAttack (standard "
                        "version, one row per sub-attack) for linf and l2 (default: %(default)s)")
    if not prefix:  # the --eval-* spellings of earlier versions: accepted with a warning, not listed
        for name, dest, cast, _, _ in _EVAL_FLAGS:
            p.add_argument(f"--eval-{name}", dest=dest, type=cast, action=_Deprecated, use=f"--{name}",
                           help=argparse.SUPPRESS)


def _methods_help() -> str:
    """One line per training method: what ``--method NAME`` trains."""
    from pyens.training import METHODS

    width = max(map(len, METHODS))
    lines = [f"  {name:{width}s}  {METHODS[name].doc}" for name in sorted(METHODS)]
    return "methods (--method):\n" + "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse that names the closest valid spelling in its errors (``pyens trian`` -> train,
    ``--methd`` -> --method), the latter with the subcommand's own usage."""

    def error(self, message: str):
        import difflib
        import re

        bad = re.search(r"invalid choice: '([^']*)'", message)
        if bad:
            choices = [str(c) for a in self._actions if a.choices for c in a.choices]
            close = difflib.get_close_matches(bad.group(1), choices, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self
            for action in self._actions:  # the subcommand's parser: its usage, its flags
                if isinstance(action, argparse._SubParsersAction):
                    parser = action.choices.get(getattr(ns, action.dest, None), self)
            parser.unrecognized(extras)
        return ns

    def unrecognized(self, extras: list[str]):
        import difflib

        options = [o for a in self._actions for o in a.option_strings if a.help != argparse.SUPPRESS]
        said = []
        for arg in extras:
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1) if arg.startswith("-") else []
            said.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
        self.error("unrecognized arguments: " + " ".join(said))


def build_parser() -> argparse.ArgumentParser:
    import torch

    from pyens import __version__

    p = _Parser(prog="pyens", description="Robust ensembles (MAT, DML) with fused kernels.")
    p.add_argument("--version", action="version", version=f"pyens {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, build flags, devices and active backends")
    info.add_argument("-v", "--verbose", action="store_true", help="also say why the other backends are not used")
    info.set_defaults(func=cmd_info)
    st = sub.add_parser("selftest", help="check every op on every available backend against the float64 reference",
                        description="Runs every op (forward and backward) on every available backend of the device, "
                                    "in each dtype it takes, on a fixed set of hard cases, against the float64 "
                                    "reference with the test suite's tolerances; prints a table and exits 1 on "
                                    "any failure. Dispatch runs the --quick subset itself the first time a backend "
                                    "serves an op (cached; PYENS_SELFTEST=0 turns that off).")
    st.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: %(default)s)")
    st.add_argument("--backend", default=None, choices=("cuda", "triton", "cpu"),
                    help="only this backend (default: every available one)")
    st.add_argument("--quick", action="store_true", help="only the quick subset dispatch runs on first use")
    st.set_defaults(func=cmd_selftest)
    tr = sub.add_parser("train", help="train MAT or a baseline (no arguments: the quick MNIST MAT run)",
                        description="Train, then evaluate. Flags override the config (default: quick-mnist).",
                        epilog=_methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--config", default=None,
                    help=f"a TOML file or a shipped config name (default: {DEFAULT_CONFIG}; with --resume: the run's)")
    defaults = _config_defaults()
    for flag, (cast, help_text) in _train_flags().items():
        shown = _shown(defaults[flag]).replace("%", "%%")
        metavar = {"eps": "NORM=V,...", "alpha": "NORM=V,...", "norms": "NORM,...", "k_range": "LO,HI",
                   "random_start": "{true,false}"}.get(flag)
        tr.add_argument("--" + flag.replace("_", "-"), dest=flag, type=cast, default=None, metavar=metavar,
                        help=f"{help_text} (default: the config's; {DEFAULT_CONFIG}: {shown})")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out (default: the newest run of its name) from its checkpoint")
    tr.add_argument("--no-eval", action="store_true", help="skip the robustness table after training")
    tr.add_argument("--no-progress", action="store_true",
                    help="no progress display (default: a bar on a terminal, else a line every few seconds)")
    # The main job's table: APGD beside PGD (PGD alone overstates robustness), on 500 images so
    # that training and table together stay within minutes on 2 CPU cores.
    _eval_flags(tr, attacks="pgd+apgd", n=500)
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="robustness table (Table 4 layout) of trained runs",
                        description="Evaluate trained runs (the same attacks as pyens.evaluate's default) and "
                                    "print the robustness table; saves RUN_DIR/eval.json and eval.md. The options "
                                    "are spelled as pyens report's (--n, --batch-size, --device); the --eval-n, "
                                    "--eval-steps, ... spellings still work here, deprecated.")
    ev.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="training run directories (pyens train --out)")
    ev.add_argument("--no-progress", action="store_true",
                    help="no progress display (default: a bar on a terminal, else a line every few seconds)")
    _eval_flags(ev, attacks="pgd+apgd", prefix="")
    from pyens.cli_eval import add_model_flags

    add_model_flags(ev)
    ev.set_defaults(func=cmd_eval)
    rp = sub.add_parser("report", help="evaluate runs and write a Markdown report with tables and plots",
                        description="Table 4 (every catalogue attack), transferability (Tables 1-3, 9-12), curves, "
                                    "diagnostics and sanity checks of trained runs (or of saved evaluations), as "
                                    "OUT/report.md with PNGs beside it. Measurements are cached under OUT/data.")
    from pyens.eval.catalogue import CATALOGUE

    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                    help="training run directories, or folders holding a saved eval.json")
    rp.add_argument("--out", default="report", help="output folder (default: %(default)s)")
    rp.add_argument("--title", default=None, help="the report's heading (default: Robustness report)")
    rp.add_argument("--attacks", default="quick", choices=("quick", "paper", "pgd", "pgd+apgd"),
                    help="catalogue preset: quick (the catalogue cut to CPU size), paper (the papers' settings), "
                         "pgd (PGD linf/l2/l1), pgd+apgd (also APGD-CE and APGD-T) (default: %(default)s)")
    rp.add_argument("--only", default=None, metavar="KEY,...",
                    help=f"comma-separated catalogue keys, from {', '.join(CATALOGUE)} (default: all of the preset)")
    rp.add_argument("--set", action="append", metavar="ATTACK.PARAM=VALUE",
                    help="override a preset parameter, e.g. hsj.steps=8; repeatable (default: none)")
    rp.add_argument("--subset", action="append", metavar="ATTACK=N",
                    help="run ATTACK on the first N test images only; repeatable (default: none)")
    rp.add_argument("--n", type=int, default=1000,
                    help="test images evaluated, the first N of the test split (count; the papers use 1000) "
                         "(default: %(default)s)")
    rp.add_argument("--curves-n", type=int, default=200,
                    help="test images for the curves (count; default: %(default)s)")
    rp.add_argument("--transfer-n", type=int, default=None,
                    help="test images for the transfer tables (count; default: --n)")
    rp.add_argument("--no-curves", action="store_true", help="skip the robustness curves")
    rp.add_argument("--no-transfer", action="store_true", help="skip the transfer tables of member ensembles")
    rp.add_argument("--batch-size", type=int, default=250,
                    help="test images per attack batch (count; default: %(default)s)")
    rp.add_argument("--device", default="auto", help="where the evaluation runs: 'auto', 'cpu', 'cuda' or 'cuda:N' "
                                                      "(default: %(default)s)")
    rp.add_argument("--no-progress", action="store_true",
                    help="no progress display (default: a bar on a terminal, else a line every few seconds)")
    rp.set_defaults(func=cmd_report)
    dr = sub.add_parser("dml-report", help="the DML paper's tables for DML and baseline ensemble runs",
                        description="Tables 2, 4, 5, 6/9, 7, certified accuracy, detection, the distortion-accuracy "
                                    "curve, a gradient-masking check and CLEVER scores (Fig. 1), as "
                                    "dml_report.{json,md}, dml_curve.png and dml_clever.png.")
    dr.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="ensemble runs (dml, dml_at, ensemble, ...)")
    from pyens.eval.dml import TABLES

    dr.add_argument("--tables", default="all", metavar="TABLE,...",
                    help=f"comma-separated, from {', '.join(TABLES)}; or all (default: %(default)s)")
    dr.add_argument("--n", type=int, default=1000,
                    help="test images evaluated, the first N of the test split (count; the paper uses 1000) "
                         "(default: %(default)s)")
    dr.add_argument("--budget", default="quick", choices=("quick", "paper"),
                    help="attack budget (steps and image counts per table; pyens.eval.dml.BUDGETS) "
                         "(default: %(default)s)")
    dr.add_argument("--out", default=None, help="output folder (default: the first RUN_DIR)")
    dr.add_argument("--merge", action="store_true", help="add the tables to an existing dml_report.json")
    dr.add_argument("--device", default="auto", help="where the evaluation runs: 'auto', 'cpu', 'cuda' or 'cuda:N' "
                                                      "(default: %(default)s)")
    dr.add_argument("--no-progress", action="store_true",
                    help="no progress display (default: a bar on a terminal, else a line every few seconds)")
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
    demo.add_argument("--device", default="auto",
                      help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: %(default)s)")
    demo.add_argument("--batch", type=int, default=128, help="rows per member (count; default: %(default)s)")
    demo.add_argument("--steps", type=int, default=100, help="steps timed per backend (count; default: %(default)s)")
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
