"""``pyens eval --model``: evaluate a model trained anywhere (the flags and the command).

    pyens eval --model my_pkg.models:build --weights w.pt --data cifar10 --data-dir ~/data \\
        --threat cifar10-leaderboard --normalize cifar10 --attacks quick

Writes OUT/eval.json (per-example results, versions, threat model, examples, seed, sanity
checks) and OUT/eval.md, and prints the table (or, with --summary, one JSON line).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_model_flags(ev: argparse.ArgumentParser) -> None:
    """The flags of ``pyens eval`` for a model from elsewhere, its data and its threat model."""
    from pyens.cli import per_norm_arg
    from pyens.data import NAMES
    from pyens.eval.foreign import AUTOCAST, NORMALIZE_PRESETS

    ev.description = (ev.description or "") + (" With --model instead of RUN_DIRs: a model trained anywhere "
                                               "(pyens eval --model pkg.module:build --weights w.pt).")
    g = ev.add_argument_group("a model trained elsewhere (instead of RUN_DIRs)")
    g.add_argument("--model", default=None, metavar="SPEC",
                   help="package.module:function or path/to/file.py:function (builds an nn.Module; imported from "
                        "the current folder first), or a torch.export .pt2 / TorchScript .ts file (these are "
                        "programs: load them only from sources you trust) (default: none)")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="state dict for the factory's model, read with torch.load(weights_only=True) (tensors "
                        "only; runs no code) (default: none: the model as the factory builds it)")
    g.add_argument("--model-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="keyword argument of the factory (a Python literal, else a string); repeatable (default: none)")
    g.add_argument("--normalize", default=None, metavar="mean=M,...,std=S,...",
                   help="the model expects normalised inputs: put (x - mean) / std in front of it, so that attacks "
                        f"work on pixels in [0, 1]; or one of {', '.join(NORMALIZE_PRESETS)} (default: none)")
    g.add_argument("--autocast", default=None, choices=tuple(AUTOCAST),
                   help="run the model's forward in bfloat16 or float16 (the sanity checks then compare PGD in "
                        "float32 with the same PGD in low precision) (default: float32)")
    g.add_argument("--name", default=None, help="the model's column label (default: the factory or file name)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="where eval.json and eval.md go (default: eval-NAME)")
    g.add_argument("--seed", type=int, default=0, help="attack seed: batch b starts from seed + b (default: 0)")
    d = ev.add_argument_group("data (with --model)")
    d.add_argument("--data", default="mnist", metavar="DATA",
                   help=f"a dataset name ({', '.join(NAMES)}; its test split, mnist without --data-dir: the embedded "
                        "set), an .npz with x [N, C, H, W] in [0, 1] and y [N], or an image folder with one "
                        "subfolder per class (default: %(default)s)")
    d.add_argument("--data-dir", default=None, help="folder holding the named dataset's files (default: none)")
    d.add_argument("--resize", default=None, metavar="H[xW]", help="image folder: resize every image (default: none)")
    t = ev.add_argument_group("threat model")
    t.add_argument("--threat", default=None, metavar="NAME",
                   help="a named threat model (pyens eval --list-threats); --eps values replace its radii "
                        "(default: the MAT paper's radii of a pyens run's or a named dataset)")
    t.add_argument("--eps", type=per_norm_arg, default=None, metavar="NORM=EPS,...",
                   help="radii in pixel units, fractions allowed: linf=8/255,l2=0.5,l1=12; without --threat only "
                        "the norms named are attacked (default: none)")
    t.add_argument("--alpha", type=per_norm_arg, default=None, metavar="NORM=STEP,...",
                   help="PGD step sizes per norm (default: 2.5 eps / steps; l1: max(10 eps / steps, eps / 20))")
    t.add_argument("--list-threats", action="store_true", help="list the named threat models with their sources")
    ev.add_argument("--summary", action="store_true",
                    help="print one JSON line per model (clean, per-norm, union, failed sanity checks) instead of "
                         "the table")


def _model_args(items) -> dict:
    from pyens.cli import literal_arg

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"--model-arg: expected KEY=VALUE with KEY a Python name, got {item!r}")
        out[key.strip()] = literal_arg(value)
    return out


def _earlier(path: Path, info: dict, args: argparse.Namespace):
    """The report saved in ``path`` by an earlier run of the same model (same file hashes,
    arguments, normalisation), data, precision and seed: its attacks with unchanged
    parameters are reused (``pyens.evaluate(resume=)``); None when there is none."""
    from pyens.eval.results import RobustnessReport

    if not path.is_file():
        return None
    try:
        saved = RobustnessReport.from_json(path)
    except (ValueError, KeyError, TypeError):
        return None
    same = {"source": json.loads(json.dumps(info)), "data": args.data, "data_dir": args.data_dir,
            "resize": args.resize, "autocast": args.autocast, "seed": args.seed}
    return saved if all(saved.meta.get(k) == v for k, v in same.items()) else None


def _label(spec: str) -> str:
    """``pkg.models:build`` -> ``models.build``; ``dir/net.py:build`` -> ``net.build``; ``net.pt2`` -> ``net``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or Path(spec).is_file():
        return Path(spec).stem
    return f"{Path(target).stem if target.endswith('.py') else target.rpartition('.')[2]}.{attr}"


def evaluate_model(args: argparse.Namespace) -> int:
    """``pyens eval --model ...``: load, check, evaluate, run the sanity checks, save, print."""
    import torch

    from pyens.cli import check_eval_flags, eps_table_arg
    from pyens.eval.foreign import (
        AUTOCAST,
        Autocast,
        check_model,
        load_data,
        load_model,
        model_checks,
        parse_normalize,
        parse_resize,
        summary,
    )
    from pyens.eval.results import format_table
    from pyens.eval.robustness import evaluate, labelled
    from pyens.eval.sanity import MASKING_VERDICT
    from pyens.eval.threats import threat_model, threat_specs
    from pyens.atomic_files import atomic_write_text
    from pyens.training.run_dir import RunDir

    device = check_eval_flags(args)
    normalize = parse_normalize(args.normalize) if args.normalize else None
    model, info = load_model(args.model, weights=args.weights, model_args=_model_args(args.model_arg),
                             normalize=normalize)
    data = load_data(args.data, data_dir=args.data_dir, resize=parse_resize(args.resize), n=args.eval_n)
    dataset = getattr(data, "name", None)
    threat = threat_model(args.threat, eps_table_arg(args.eps), dataset)
    specs = threat_specs(args.attacks, threat, dataset, steps=args.eval_steps, restarts=args.eval_restarts,
                         alpha=eps_table_arg(args.alpha, "--alpha"))
    x, y = labelled(data, args.eval_n)
    check_model(model, x, y)
    name = args.name or _label(args.model)
    low = Autocast(model, AUTOCAST[args.autocast]) if args.autocast else None
    judged = low if low is not None else model
    out = Path(args.out or f"eval-{name}")
    resume = _earlier(RunDir(out).eval_json, info, args)
    report = evaluate(judged, data, attacks=specs, n=args.eval_n, batch_size=args.eval_batch_size, device=device,
                      name=name, dataset=dataset, progress=not args.no_progress, seed=args.seed, resume=resume)
    checks = model_checks(model, data, report, threat, low=low, n=min(args.eval_n, 100),
                          batch_size=args.eval_batch_size, device=device, seed=args.seed)
    report.meta.update(threat=threat, threat_preset=args.threat, attacks=args.attacks, autocast=args.autocast,
                       data=args.data, data_dir=args.data_dir, resize=args.resize,
                       pixel_space=("normalised inside pyens by --normalize" if normalize else
                                    "the model takes pixels in [0, 1]"),
                       checks=[c.to_dict() for c in checks], **{"source": info})
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(RunDir(out).eval_json)
    atomic_write_text(_markdown(report, checks), RunDir(out).eval_md)
    if args.summary:
        print(json.dumps(summary(report, checks)))
        return 0
    where = ", ".join(f"{p} {e:g}" for p, e in threat.items())
    source = " + ".join(filter(None, [args.threat, "--eps" if args.eps else None])) or f"{dataset} paper radii"
    print(f"\nrobust accuracy (%) of {args.model} on the first {report.n} images of {args.data}, threat model "
          f"{source} ({where}), --attacks {args.attacks}{', forward in ' + args.autocast if args.autocast else ''}:")
    if normalize:
        print(f"inputs normalised by --normalize mean={list(normalize[0])}, std={list(normalize[1])} inside the "
              "evaluated model: attacks and radii are in pixel space [0, 1]")
    if report.meta.get("randomized"):
        print("the model is randomized: AutoAttack runs its rand version (APGD with EOT)")
    print(format_table([report]))
    print("sanity checks (Carlini et al. 2019):")
    for c in checks:
        print(f"  {c.verdict:42s} {c.name}: {c.detail}")
        for v in c.violations:
            print(f"    - {v}")
    if any(c.passed is False for c in checks):
        print(f"verdict: {MASKING_VERDICT}")
    print(f"saved {out / 'eval.json'} and {out / 'eval.md'} (torch {torch.__version__})")
    return 0


def _markdown(report, checks) -> str:
    from pyens.eval.results import format_table, markdown_table

    m = report.meta
    lines = [f"# {report.model}", "", f"Model: `{m['source']['model']}`"
             + (f", weights `{m['source']['weights']}` (sha256 {m['source'].get('sha256', '?')[:12]})"
                if m['source'].get('weights') else ""), "",
             f"Inputs: {m['pixel_space']}" + (f" ({m['source']['normalize']})" if m['source'].get('normalize') else "")
             + ".", "",
             f"Threat model: {', '.join(f'{p} {e:g}' for p, e in m['threat'].items())}"
             + (f" (`--threat {m['threat_preset']}`)" if m.get("threat_preset") else "") + f"; {report.n} examples "
             f"(the first {report.n}), seed {m['seed']}; versions {m['versions']}.", ""]
    if m.get("autocast"):
        lines += [f"Forward in {m['autocast']} (torch.autocast).", ""]
    if m.get("randomized"):
        lines += ["The model is randomized: AutoAttack runs its rand version (APGD-CE and APGD-DLR with EOT).", ""]
    lines += [format_table([report], markdown=True), "## Sanity checks", "",
              markdown_table(["check", "verdict", "what was compared"],
                             [[c.name, c.verdict, c.detail] for c in checks])]
    return "\n".join(lines)
