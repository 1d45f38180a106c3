"""``pyens report`` and ``pyens eval``: evaluate trained runs and write the Markdown report.

:func:`evaluate_run` is the one evaluation path of a run directory (``pyens eval`` and
``pyens report`` both call it). :func:`report_runs` adds, per run, the robustness curves, the
transfer tables (member ensembles), the gradient-similarity histograms, the per-epoch
diagnostics of ``metrics.jsonl`` and the sanity checks, and writes ``report.md`` with the
PNGs beside it.

Everything measured is cached as JSON under ``OUT/data/<run>/`` together with the settings
and a fingerprint of the checkpoint: re-running the command reuses what still matches (per
attack for the evaluation), so an interrupted report resumes, and a changed setting or a
retrained model is measured again. A RUN_DIR without a checkpoint but with a saved
evaluation (``eval.json``, and optionally ``curves.json`` / ``transfer.json``) is reported
from those files alone.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyens.atomic_files import atomic_write_text
from pyens.eval.catalogue import CATALOGUE, DEFAULT_PRESET, catalogue, describe, preset_params
from pyens.eval.curves import Curves, robustness_curves
from pyens.eval.diagnostics import gradient_cosine, read_metrics
from pyens.eval.results import PARTIAL, RobustnessReport, format_table, markdown_table
from pyens.eval.robustness import evaluate, labelled, resolve_attacks
from pyens.eval.markdown import check_details, checks_table, pct
from pyens.eval.sanity import Check, run_checks
from pyens.eval.transfer import TransferReport, submodel_table, transfer_tables
from pyens.training.run_dir import EVAL_JSON, RunDir

UNATTACKED = ("standard", "mimo", "ensemble")  # methods trained without an inner maximisation
ENSEMBLE_LABELS = {"mat": "MAT", "mat_msd": "MAT+MSD", "mat_same": "MAT (same norm)", "mimo_at": "MIMO AT",
                   "mimo": "MIMO", "ensemble_at": "Vanilla ensemble"}


@dataclass
class Settings:
    """What ``pyens report`` measures.

    Attributes:
        preset: the catalogue preset (``"paper"``, ``"quick"``, ``"pgd"``, ``"pgd+apgd"``); it also sets the
            PGD of the curves and the transfer tables.
        n: examples for the catalogue (the papers: the first 1000 test images).
        curves_n / transfer_n: examples for the curves and the transfer tables (None: ``n``).
        only / params / subsets: see :func:`pyens.eval.catalogue`.
        curves / transfer: measure them (transfer only for member ensembles).
    """

    preset: str = "quick"
    n: int = 1000
    batch_size: int = 250
    device: str = "auto"  # "auto" (CUDA when visible), "cpu", "cuda", "cuda:N"
    curves_n: int | None = 200
    transfer_n: int | None = None
    only: list | None = None
    params: dict = field(default_factory=dict)
    subsets: dict = field(default_factory=dict)
    curves: bool = True
    transfer: bool = True
    seed: int = 0
    progress: bool = True

    def specs(self, dataset: str):
        return catalogue(self.preset, dataset, only=self.only, params=self.params, subsets=self.subsets)

    def pgd(self, dataset: str) -> dict:
        """The PGD parameters of the curves and transfer tables: the preset's, with ``params``."""
        table = preset_params(self.preset, dataset)
        return {k: {**table[k], **self.params.get(k, {})} for k in ("pgd_linf", "pgd_l2", "pgd_l1")}


@dataclass
class RunResults:
    """Everything measured on one run."""

    name: str
    run_dir: Path
    config: dict
    report: RobustnessReport
    curves: Curves | None = None
    transfers: list[TransferReport] = field(default_factory=list)
    cosine: dict | None = None
    history: list = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name


# ---------------------------------------------------------------------------------------------
# caching

def fingerprint(run_dir: Path) -> str:
    """SHA-1 of the run's checkpoint (a retrained model invalidates the cache)."""
    h = hashlib.sha1()
    with open(RunDir(run_dir).checkpoint, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_cached(path: Path, key: dict):
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    return d["value"] if d.get("key") == key else None


def _save_cached(path: Path, key: dict, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"key": key, "value": value}), path)


# ---------------------------------------------------------------------------------------------
# evaluation of one run

def evaluate_run(run_dir: str | Path, *, attacks=DEFAULT_PRESET, n: int = 1000, batch_size: int = 250,
                 device: str | torch.device = "auto", progress: bool = True, seed: int = 0,
                 cache: str | Path | None = None, run=None) -> RobustnessReport:
    """Evaluate the trained run in ``run_dir`` on the first ``n`` test images.

    Args:
        attacks: a preset name (default ``"pgd+apgd"``, as :func:`pyens.evaluate`'s and ``pyens
            eval``'s), a list of :class:`~pyens.eval.AttackSpec`, or a callable
            ``dataset -> list[AttackSpec]`` (the radii depend on the run's dataset).
        device: ``"auto"`` (CUDA when visible), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        cache: a JSON file: its attacks that still match are reused, and the report is saved
            there after every attack (default: none).
        run: the already loaded :class:`~pyens.training.Run` (default: load it).
    """
    from pyens.data import load
    from pyens.training import load_run
    from pyens.training.distributed import resolve_device

    device = resolve_device(device)
    run = run or load_run(run_dir, device)
    cfg = run.config
    data = load(cfg.dataset, "test", data_dir=cfg.data_dir or None)
    specs = attacks(cfg.dataset) if callable(attacks) else resolve_attacks(attacks, cfg.dataset)
    cache = Path(cache) if cache else None
    meta = dict(method=cfg.method, model=cfg.model, epochs=run.epoch, norms=list(cfg.norms),
                checkpoint=fingerprint(run.out))
    resume = None  # earlier results of this checkpoint: the cache, then the run's own eval.json
    for path in filter(None, [cache, RunDir(run_dir).eval_json]):
        if path.exists():
            try:
                saved = RobustnessReport.from_json(path)
            except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
                warnings.warn(f"{path} is unreadable ({exc}); evaluating from scratch", stacklevel=2)
                continue
            if saved.meta.get("checkpoint") == meta["checkpoint"]:
                if resume is None:
                    resume = saved
                elif saved.n == resume.n:
                    have = {a.name for a in resume.attacks}
                    resume.attacks += [a for a in saved.attacks if a.name not in have]

    def save(rep: RobustnessReport) -> None:
        if cache is not None:
            rep.meta.update(meta)
            cache.parent.mkdir(parents=True, exist_ok=True)
            rep.to_json(cache)

    report = evaluate(run.model, data, attacks=specs, n=n, batch_size=batch_size, device=device,
                      name=Path(run_dir).name, dataset=cfg.dataset, progress=progress, seed=seed, resume=resume,
                      on_result=save)
    report.meta.update(meta)
    save(report)
    return report


def _saved(path: Path):
    """A saved JSON: plain, or as the report's cache writes it (``{"key", "value"}``); None if absent."""
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    return d["value"] if isinstance(d, dict) and set(d) == {"key", "value"} else d


def _from_saved(run_dir: Path) -> RunResults:
    """A directory with a saved evaluation and no checkpoint (e.g. ``OUT/data/<run>`` of an earlier
    report): report what it holds (``eval.json``, and ``curves.json``, ``transfer.json``,
    ``cosine.json`` if there)."""
    report = RobustnessReport.from_json(RunDir(run_dir).eval_json)
    report.model = run_dir.name
    curves, transfers = _saved(run_dir / "curves.json"), _saved(run_dir / "transfer.json") or []
    res = RunResults(run_dir.name, run_dir, {"method": report.meta.get("method", "?"),
                                             "model": report.meta.get("model", "?"),
                                             "norms": report.meta.get("norms", []),
                                             "epochs": report.meta.get("epochs", "-")},
                     report, curves and Curves.from_dict(curves), [TransferReport.from_dict(t) for t in transfers],
                     _saved(run_dir / "cosine.json"), read_metrics(run_dir))
    res.checks = run_checks(report, res.curves, res.transfers)
    return res


def measure_run(run_dir: str | Path, out: str | Path, settings: Settings) -> RunResults:
    """Evaluation, curves, transfer tables, cosine histograms and sanity checks of one run,
    cached under ``out/data/<run>/`` (see the module docstring)."""
    import dataclasses

    from pyens.data import load
    from pyens.training import load_run
    from pyens.training.distributed import resolve_device

    settings = dataclasses.replace(settings, device=str(resolve_device(settings.device, "settings.device")))
    run_dir = Path(run_dir)
    if not RunDir(run_dir).checkpoint.exists() and RunDir(run_dir).eval_json.exists():
        return _from_saved(run_dir)
    name = run_dir.name
    cache = Path(out) / "data" / name
    run = load_run(run_dir, settings.device)
    cfg = run.config
    data = load(cfg.dataset, "test", data_dir=cfg.data_dir or None)
    fp = fingerprint(run_dir)
    s = settings
    seconds = {}
    t0 = time.perf_counter()
    report = evaluate_run(run_dir, attacks=s.specs, n=s.n, batch_size=s.batch_size, device=s.device,
                          progress=s.progress, seed=s.seed, cache=cache / EVAL_JSON, run=run)
    seconds["evaluation"] = sum(a.seconds for a in report.attacks)
    res = RunResults(name, run_dir, {"method": cfg.method, "model": cfg.model, "dataset": cfg.dataset,
                                     "norms": list(cfg.norms), "members": cfg.members, "epochs": run.epoch,
                                     "steps": cfg.steps},
                     report, history=read_metrics(run_dir))
    if s.curves:
        key = {"checkpoint": fp, "pgd": s.pgd(cfg.dataset), "n": s.curves_n or s.n, "seed": s.seed}
        value = _load_cached(cache / "curves.json", key)
        t0 = time.perf_counter()
        if value is None:
            curves = robustness_curves(run.model, data, dataset=cfg.dataset, pgd=key["pgd"], n=key["n"],
                                       batch_size=s.batch_size, device=s.device, name=name, seed=s.seed,
                                       progress=s.progress)
            _save_cached(cache / "curves.json", key, curves.to_dict())
            seconds["curves"] = time.perf_counter() - t0
        res.curves = curves if value is None else Curves.from_dict(value)
    if hasattr(run.model, "member"):
        label = ENSEMBLE_LABELS.get(cfg.method, name)
        if s.transfer:
            key = {"checkpoint": fp, "pgd": s.pgd(cfg.dataset), "n": s.transfer_n or s.n}
            value = _load_cached(cache / "transfer.json", key)
            if value is None:
                t0 = time.perf_counter()
                reports = transfer_tables(run.model, data, dataset=cfg.dataset, pgd=key["pgd"], n=key["n"],
                                          batch_size=s.batch_size, device=s.device, name=name,
                                          ensemble_label=label, progress=s.progress)
                value = [r.to_dict() for r in reports]
                _save_cached(cache / "transfer.json", key, value)
                seconds["transfer"] = time.perf_counter() - t0
            res.transfers = [TransferReport.from_dict(v) for v in value]
        key = {"checkpoint": fp, "n": min(s.n, 500)}
        value = _load_cached(cache / "cosine.json", key)
        if value is None:
            x, y = labelled(data, key["n"])
            members = run.members()
            cos = gradient_cosine([m.to(s.device) for m in members], x.to(s.device), y.to(s.device))
            value = {"pairs": cos["pairs"], "grad": cos["grad"].tolist(), "sign": cos["sign"].tolist()}
            _save_cached(cache / "cosine.json", key, value)
        res.cosine = value
    res.checks = run_checks(report, res.curves, res.transfers)
    res.seconds = seconds
    return res


# ---------------------------------------------------------------------------------------------
# the Markdown report

def _attack_table(results: list[RunResults]) -> str:
    rows, seen = [], set()
    for r in results:
        for a in r.report.attacks:
            if a.name in seen:
                continue
            seen.add(a.name)
            lib = CATALOGUE[a.key].library if a.key in CATALOGUE else "-"
            subset = f"first {int(a.attacked.sum())} of {r.report.n}" if a.partial else f"all {r.report.n}"
            rows.append([a.name, lib, a.kind, describe(a.params), subset, a.note or "paper preset"])
    return markdown_table(["Attack", "library", "kind", "parameters", "examples", "differences from the paper preset"],
                          rows)


def _seconds_table(results: list[RunResults]) -> str:
    names = [a.name for a in results[0].report.attacks]
    body = [[n] + [f"{r.report.result(n).seconds:.0f}" if n in {a.name for a in r.report.attacks} else "-"
                   for r in results] for n in names]
    done = {"curves": lambda r: r.curves is not None, "transfer": lambda r: bool(r.transfers)}
    for part, has in done.items():
        if any(has(r) for r in results):
            body.append([part] + [f"{r.seconds[part]:.0f}" if part in r.seconds else "(cached)" if has(r) else "-"
                                  for r in results])
    return markdown_table(["Wall-clock seconds"] + [r.label for r in results], body)


def _reductions(results: list[RunResults], settings: Settings) -> list[str]:
    """Every way this report's measurements fall short of the papers' protocol (never silent)."""
    out = []
    n = results[0].report.n
    if n < 1000:
        out.append(f"- Table 4 rows on the first {n} test images (papers: 1000).")
    curves = next((r.curves for r in results if r.curves is not None), None)
    if curves is not None and curves.n < 1000:
        out.append(f"- Curves (Figs. 2-3) and the sanity checks built on them on the first {curves.n} test images.")
    t = next((r.transfers[0] for r in results if r.transfers), None)
    if t is not None and t.n < 1000:
        out.append(f"- Transfer tables on the first {t.n} test images (papers: 1000).")
    seen = set()
    for r in results:
        for a in r.report.attacks:
            if a.note and a.name not in seen:
                seen.add(a.name)
                out.append(f"- {a.name}: {a.note}.")
    return out or ["- None: the paper preset on 1000 test images."]


def _runs_table(results: list[RunResults]) -> str:
    body = []
    for r in results:
        c = r.config
        norms = ", ".join(c.get("norms", [])) if c.get("method") not in UNATTACKED else "-"
        body.append([r.label, str(c.get("method", "?")), str(c.get("model", "?")), norms,
                     str(c.get("members", "-")), str(c.get("epochs", "-")), str(c.get("steps", "-")),
                     f"{pct(r.report.accuracies()['Clean accuracy'], 1)}%"])
    return markdown_table(["Run", "method", "backbone", "training norms (per member)", "M", "epochs",
                           "train PGD steps", "clean accuracy"], body)


def write_markdown(results: list[RunResults], out: Path, settings: Settings, figures: dict, *,
                   title: str, command: str | None = None) -> Path:
    n = results[0].report.n
    lines = [f"# {title}", ""]
    lines.append(f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `{command or 'pyens report'}` "
                 f"(pyens {_version()}, torch {torch.__version__}, {settings.device}, "
                 f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}).")
    lines.append("")
    lines.append(f"Robust accuracy is measured on the first {n} test images; an example counts as robust to an "
                 "attack if the model classifies it correctly both clean and attacked (and an attack's output only "
                 "counts if it lies within the radius: linf 0.3, l2 2, l1 10 on MNIST). The \"All\" rows are "
                 "per-example worst cases (MAT paper, Table 4).")
    lines += ["", "## Runs", "", _runs_table(results)]
    lines += ["## Reductions from the papers' protocol", "", *_reductions(results, settings), ""]
    lines += ["## Robust accuracy (%), Table 4 layout", "", format_table([r.report for r in results], markdown=True)]
    if any(a.partial for r in results for a in r.report.attacks):
        lines.append(f"{PARTIAL} run on a subset of the examples (see the attack table): the attack's own row is its "
                     "accuracy on that subset; in the union rows an example it did not run on counts as robust to "
                     "it, so they are upper bounds.")
        lines.append("")
    lines += ["## Attacks and their parameters", "",
              f"Preset `{settings.preset}`. Every difference from the paper's preset is listed in the last column "
              "(the CPU reductions of this report).", "", _attack_table(results)]
    lines += ["How the attacks are judged and run:", "",
              "- Every attack's output counts only inside the radius (checked per example, relative slack 1e-4); "
              "minimum-norm attacks (CW, EAD, HSJ, Boundary, salt & pepper) run unbounded and succeed where their "
              "adversarial example lies within it. Their per-example distances give the distortion-accuracy curves.",
              "- White-box attacks follow the gradient of the ensemble's averaged output (a DML ensemble: its "
              "differentiable surrogate); black-box attacks (HSJ, Boundary, salt & pepper) see only its decisions.",
              "- CW is foolbox's `L2CarliniWagnerAttack` (binary search on c): torchattacks' `CW` stops a whole batch "
              "when the batch-summed cost rises and freezes pixels at exactly 0 or 1 (atanh(±1) = ±inf); on the quick "
              "standard model it left 61-80% robust where foolbox's left 13% and PGD 10%.",
              "- Salt & pepper (foolbox) keeps its smallest-l2 success; it is judged in l1 (Table 4 lists it there).",
              "- HSJ and Boundary start from foolbox's own initialisation (blended uniform noise) per input; an input "
              "without an adversarial start counts as a failure of the attack (foolbox itself aborts the batch).",
              ""]
    checks = [(r.label, r.checks) for r in results]
    lines += ["## Sanity checks (Carlini et al. 2019)", "",
              "A failed check means the evaluation may overestimate robustness (possible gradient masking).", "",
              checks_table(checks), *check_details(checks), ""]
    for r in results:
        if not r.transfers:
            continue
        t = r.transfers[0]
        lines += [f"## Transferability: {r.label} (Tables 1, 2, 9-12)", "",
                  f"PGD ({t.params.get('steps')} steps, from delta = 0) crafted on each sub-model (rows) and on the "
                  f"ensemble, misclassified examples out of {t.n} counted on every sub-model and the ensemble "
                  "(columns): N_ij with r_ij = N_ij / N_ii in parentheses. Sub-model m was trained against "
                  f"{', '.join(r.config.get('norms', [])) or '?'} (in order). The last row counts clean errors.", ""]
        for t in r.transfers:
            lines += [f"**{t.norm}, eps {t.eps:g}**", "", t.table(markdown=True)]
        lines += ["Sub-model robustness (Table 3), robust accuracy (%) under PGD crafted on the judged model itself:",
                  "", submodel_table(r.transfers, markdown=True)]
    lines += ["## Curves", ""]
    for key, caption in (("curves", "Robust accuracy vs PGD steps (top) and vs radius (bottom), MAT Figs. 2-3"),):
        if key in figures:
            lines += [f"{caption} (first {results[0].curves.n if results[0].curves else '?'} test images):", "",
                      f"![{caption}]({figures[key]})", ""]
    for r in results:
        if f"distortion-{r.name}" in figures:
            lines += [f"Distortion-accuracy curves of {r.label}: for each minimum-norm attack, the share of examples "
                      "still robust when the allowed distortion is r (dashed: the PGD radius sweep).", "",
                      f"![distortion-accuracy {r.label}]({figures[f'distortion-{r.name}']})", ""]
    lines += ["## Training diagnostics", ""]
    for key, caption in (("cross_gradient", "Cross-gradient ratio per epoch (MAT Fig. 1)"),
                         ("disagreement", "Steepest-direction disagreement E_1, E_inf per epoch (MAT App. D, Fig. 4)"),
                         ("cosine", "Cosine similarity of the members' input gradients at the end of training "
                                    "(DML paper Figs. 9-11)")):
        if key in figures:
            lines += [f"{caption}:", "", f"![{caption}]({figures[key]})", ""]
    timing = _seconds_table(results)
    lines += ["## Cost", "", "Wall-clock seconds of each measurement on this machine (cached parts were measured "
              "by an earlier invocation).", "", timing]
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _version() -> str:
    import pyens

    return pyens.__version__


def report_runs(run_dirs, out: str | Path, settings: Settings | None = None, *, title: str | None = None,
                command: str | None = None) -> Path:
    """Measure every run (cached) and write ``out/report.md`` with its PNGs; returns its path."""
    from pyens.eval import plots

    import dataclasses

    from pyens.training.distributed import resolve_device

    settings = settings or Settings()
    settings = dataclasses.replace(settings, device=str(resolve_device(settings.device, "settings.device")))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [measure_run(d, out, settings) for d in run_dirs]
    figures = {}
    curves = [r.curves for r in results if r.curves is not None]
    if curves:
        figures["curves"] = plots.plot_curves(curves, out / "curves.png").name
    for r in results:
        if r.report.attacks:
            figures[f"distortion-{r.name}"] = plots.plot_distortion(r.report, out / f"distortion-{r.name}.png",
                                                                    r.curves).name
    histories = {r.label: r.history for r in results}
    norms = next((r.config.get("norms") for r in results if r.history and "cross_gradient_ratio" in r.history[-1]),
                 None)
    if any("cross_gradient_ratio" in h for r in results for h in r.history):
        figures["cross_gradient"] = plots.plot_cross_gradient(histories, out / "cross_gradient.png", norms).name
    if any("steepest_disagreement" in h for r in results for h in r.history):
        figures["disagreement"] = plots.plot_disagreement(histories, out / "disagreement.png", norms).name
    cos = {r.label: r.cosine for r in results if r.cosine}
    if cos:
        figures["cosine"] = plots.plot_cosine(cos, out / "gradient_cosine.png",
                                              {r.label: r.config.get("norms") for r in results}).name
    for r in results:
        (out / "data" / r.name).mkdir(parents=True, exist_ok=True)
        (out / "data" / r.name / "checks.json").write_text(json.dumps([c.to_dict() for c in r.checks], indent=1))
    return write_markdown(results, out, settings, figures, title=title or "Robustness report", command=command)
