"""Markdown of the reports: percentages, the sanity checks' table and the DML paper's report.

:func:`pct` formats an accuracy; :func:`checks_table` and :func:`check_details` lay out
:class:`pyens.eval.sanity.Check` lists, one column per model (``pyens report`` and
``pyens dml-report`` alike); :func:`dml_markdown` lays out the JSON of
:func:`pyens.eval.dml.dml_report` as the DML paper does. Tables are
:func:`pyens.eval.results.markdown_table`'s.
"""
from __future__ import annotations

import math

from pyens.eval.results import markdown_table
from pyens.eval.sanity import Check, curve_label, flagged, verdict


def pct(v: float | None, digits: int = 2) -> str:
    """An accuracy ``v`` in [0, 1] as a percentage with ``digits`` decimals (``"-"``: None or nan)."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# sanity checks

def checks_table(columns: list[tuple[str, list[Check]]]) -> str:
    """``columns``: ``(label, checks)`` per model, the same checks in the same order; one row per
    check (its verdict, and its value in % where it has one), then the overall verdict."""
    names = [c.name for c in columns[0][1]]
    cell = lambda c: c.verdict + ("" if c.value is None else f" ({pct(c.value, 1)}%)")  # noqa: E731
    body = [[n] + [next(cell(c) for c in checks if c.name == n) for _, checks in columns] for n in names]
    body.append(["**verdict**"] + [f"**{verdict(checks)}**" if flagged(checks) else verdict(checks)
                                   for _, checks in columns])
    return markdown_table(["Sanity check"] + [label for label, _ in columns], body)


def check_details(columns: list[tuple[str, list[Check]]]) -> list[str]:
    """Lines: what each check that ran compares (once), then every failure with what fired it."""
    lines, seen = ["What each check compares:", ""], set()
    for _, checks in columns:
        for c in checks:
            if c.passed is not None and c.name not in seen:
                seen.add(c.name)
                lines.append(f"- {c.name}: {c.detail}.")
    failures = [(label, c) for label, checks in columns for c in checks if c.passed is False]
    lines += ["", "Failures:" if failures else "No check failed.", ""]
    for label, c in failures:
        lines.append(f"- **{label}**, {c.name}:")
        lines += [f"  - {v}" for v in c.violations]
    return lines


# ---------------------------------------------------------------------------------------------
# the DML paper's report (accuracies in %, two decimals, as the paper prints them)

def _transfer_md(tables: dict) -> str:
    lines = []
    for name, t in tables.items():
        header = [name, *t["columns"]]
        body = [[row] + [pct(v) for v in vals] for row, vals in t["rows"].items()]
        body.append(["Targeted: target reached"] + [pct(v) for v in t["target_hit"]])
        lines.append(markdown_table(header, body))
    return "\n".join(lines)


def _table5_md(tables: dict) -> str:
    lines = []
    for name, t in tables.items():
        cols = list(t["columns"])
        header = [name, *cols]
        body = [["Adversarial accuracy"] + [pct(t["columns"][c]["accuracy"]) for c in cols],
                ["Target reached"] + [pct(t["columns"][c]["success"]) for c in cols],
                ["Average distortion (l2)"] + [f"{t['columns'][c]['distortion']:.2f}" for c in cols]]
        lines.append(markdown_table(header, body))
    return "\n".join(lines)


def _rows_md(reports: list[dict], label: str = "Model") -> str:
    """Saved :class:`~pyens.eval.results.RobustnessReport` dicts, one row per model, one column per
    attack (the paper's Table 2 layout), read from their ``accuracy`` rows."""
    names = [a["name"] for a in reports[0]["attacks"]]
    header = [label, "Benign Acc"] + names
    body = [[r["model"], pct(r["accuracy"]["Clean accuracy"])] + [pct(r["accuracy"][a]) for a in names]
            for r in reports]
    return markdown_table(header, body)


def _curve_md(curves: dict) -> str:
    lines = []
    for name, c in curves.items():
        header = [f"{name}: eps"] + [f"{e:g}" for e in c["eps"]]
        body = [[curve_label(c, a)] + [pct(v) for v in vals] for a, vals in c["accuracy"].items()]
        lines.append(markdown_table(header, body))
    return "\n".join(lines)


def _surrogates_md(reports: dict) -> str:
    """Saved surrogate reports per model: one row per surrogate, then the per-example best of all
    (the report's "All attacks" row)."""
    rows = [a["name"] for a in next(iter(reports.values()))["attacks"]]
    header = ["Attack"] + list(reports)
    body = [[r] + [pct(rep["accuracy"][r]) for rep in reports.values()] for r in rows]
    body.append(["per-example best of all"] + [pct(rep["accuracy"]["All attacks"]) for rep in reports.values()])
    return markdown_table(header, body)


def _certified_md(tables: dict) -> str:
    lines = []
    for name, t in tables.items():
        header = [f"{name}: layer, sigma"] + [f"r={r:g}" for r in t["radii"]]
        body = [[k] + [pct(v[str(r)] if str(r) in v else v[r]) for r in t["radii"]] for k, v in t["curves"].items()]
        lines.append(markdown_table(header, body))
    return "\n".join(lines)


def _detection_md(tables: dict) -> str:
    header = ["Model", "Attack", "vote fooled", "AUC agreement", "majority: benign / adv flagged",
              "unanimity: benign / adv flagged", "AUC uncertainty (LR)"]
    body = []
    for name, t in tables.items():
        for atk, r in t["attacks"].items():
            f = r["frameworks"]
            body.append([name, atk, pct(r["vote_fooled"]), f"{r['agreement']['auc']:.3f}",
                         f"{pct(f['majority']['benign_flagged'])} / {pct(f['majority']['adversarial_flagged'])}",
                         f"{pct(f['unanimity']['benign_flagged'])} / {pct(f['unanimity']['adversarial_flagged'])}",
                         f"{r['uncertainty']['auc']:.3f}"])
    return markdown_table(header, body)


def clever_markdown(section: dict, flagged_rows: int = 20) -> str:
    """The CLEVER section of a DML report (``report["clever"]``): counts per model, then up to
    ``flagged_rows`` images whose score exceeds the l2 distance of an adversarial example found."""
    models = section["models"]
    header = ["Model", "images", "non-zero", ">= 0.2", ">= 1.0", f">= {section['radius']:g} (cap)", "zero gradient",
              "attacks found (correct images)", "CLEVER > distance found"]
    body = []
    for name, t in models.items():
        c = t["counts"]
        share = f"{t['flagged_count']} ({pct(t['flagged_count'] / t['found']) if t['found'] else '-'} % of found)"
        body.append([name, str(c["n"]), str(c["non_zero"]), str(c["0.2"]), str(c["1"]),
                     str(c[f"{section['radius']:g}"]), str(c["nan"]), str(t["found"]), share])
    lines = [markdown_table(header, body)]
    dist = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [[name, str(i), str(t["label"][i]), f"{t['score'][i]:.3f}", dist(t["distance_cw"][i]),
             dist(t["distance_pgd"][i])]
            for name, t in models.items() for i, bad in enumerate(t["flagged"]) if bad]
    if rows:
        more = f" (first {flagged_rows} of {len(rows)})" if len(rows) > flagged_rows else ""
        lines += [f"Images where CLEVER exceeds the l2 distance of an adversarial example found{more}:\n",
                  markdown_table(["Model", "image", "label", "CLEVER", "CW l2", "PGD l2"], rows[:flagged_rows])]
    return "\n".join(lines)


def _clever_intro(c: dict) -> str:
    cut = ("; reduced from the paper preset: " + ", ".join(c["reductions"])) if c["reductions"] else ""
    radii = ", ".join(f"{e:g}" for e in next(iter(c["models"].values()))["settings"]["pgd_radii"])
    return ("### CLEVER scores (Fig. 1, A.6)\n\nCLEVER-u (Weng et al. 2018) of the summed member logits "
            f"in the l2 ball of radius {c['radius']:g}, first {c['images']} images: {c['batches']} batches "
            f"of {c['samples']} gradient norms drawn from {c['pool'] * c['samples']} points per image "
            f"(pool {c['pool']}), reverse Weibull fit{cut}. Misclassified images score 0. CLEVER estimates "
            "a local Lipschitz bound; it is not a certificate, and gradient masking inflates it "
            f"(Goodfellow 2018). Beside it: the smallest l2 distance at which the CW ladder ({c['cw_steps']} "
            f"steps per constant) or l2 PGD ({c['pgd_steps']} steps, random start, at eps {radii}), both "
            "crafted on and judged by the same summed logits, found an adversarial example; the last column "
            "counts the images where CLEVER's score exceeds that distance, i.e. is visibly wrong. "
            "Figure: dml_clever.png.\n")


def _honesty_md(honesty: dict) -> list[str]:
    """``honesty``: model -> its saved sanity checks (:meth:`Check.to_dict`)."""
    columns = [(name, [Check.from_dict(c) for c in checks]) for name, checks in honesty.items()]
    return ["### Honesty check (sanity checks against gradient masking)\n", checks_table(columns),
            *check_details(columns)]


def dml_markdown(report: dict) -> str:
    """The tables of a DML report (:func:`pyens.eval.dml.dml_report`'s dict) in the paper's
    layouts (accuracies in %), then its honesty check."""
    ds, n = report["dataset"], report["n"]
    parts = [(f"Dataset {ds}, first {n} test images, budget {report['budget']!r}. Attacks are crafted on the "
              "summed member logits and judged by the majority vote of top-1 (A.3).\n")]
    if "table2" in report:
        parts += ["### White-box attacks (Table 2 layout)\n", _rows_md(report["table2"], "Training Model")]
    if "transfer" in report:
        any_t = next(iter(report["transfer"].values()))
        parts += [f"### PGD-{any_t['steps']} crafted on Model 1, eps {any_t['eps']:g} (Table 4 layout)\n",
                  _transfer_md(report["transfer"])]
    if "table5" in report:
        any_t = next(iter(report["table5"].values()))
        parts += [(f"### Targeted CW-l2, c = {any_t['c']:g}, {any_t['steps']} steps, lr {any_t['lr']:g}, first "
                   f"{any_t['n']} images (Table 5 layout)\n"), _table5_md(report["table5"])]
    if report.get("table6"):
        for name, reps in report["table6"].items():
            parts += [f"### DML vs R-DML, {name} (Tables 6/9 layout)\n", _rows_md(reps)]
    if "autoattack" in report:
        k = report["autoattack"][0]["n"]
        parts += [f"### AutoAttack, first {k} images (Table 7 layout)\n", _rows_md(report["autoattack"])]
    if "certified" in report:
        parts += ["### Certified accuracy of the smoothed vote (A.9)\n", _certified_md(report["certified"])]
    if "detection" in report:
        parts += ["### Adversary detection (A.4, A.5.1)\n", _detection_md(report["detection"])]
    if "clever" in report:
        parts += [_clever_intro(report["clever"]), clever_markdown(report["clever"])]
    if "curve" in report:
        parts += ["### Distortion-accuracy curve (Fig. 18)\n", _curve_md(report["curve"])]
    if "surrogates" in report:
        parts += ["### Attack surrogates (honesty check)\n", _surrogates_md(report["surrogates"])]
    if "honesty" in report:
        parts += _honesty_md(report["honesty"])
    return "\n".join(parts) + "\n"
