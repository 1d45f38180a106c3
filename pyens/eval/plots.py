"""PNG figures of an evaluation (matplotlib, Agg): each has a title, labelled axes and a
legend, so it reads without the code.

- :func:`plot_curves`: robust accuracy vs PGD steps (top) and vs radius (bottom), per norm,
  one line per model (MAT paper Figs. 2-3).
- :func:`plot_distortion`: distortion-accuracy curves of the minimum-norm attacks (and the PGD
  radius sweep), per norm, for one model.
- :func:`plot_cross_gradient` (Fig. 1), :func:`plot_disagreement` (Fig. 4): per-epoch
  diagnostics from ``metrics.jsonl``.
- :func:`plot_cosine`: histograms of the members' gradient cosine similarities (DML Figs. 9-11).
- :func:`plot_clever`: histogram of non-zero CLEVER scores per model (DML Fig. 1, A.6) and the
  scores against the smallest l2 distance CW found.
"""
from __future__ import annotations

from pathlib import Path

from pyens.eval.catalogue import MINIMUM_NORM, NORMS
from pyens.eval.curves import Curves, distortion_curve
from pyens.eval.results import RobustnessReport

NORM_TEX = {"linf": r"$\ell_\infty$", "l2": r"$\ell_2$", "l1": r"$\ell_1$"}
E_TEX = {"l1": r"$E_1$", "linf": r"$E_\infty$"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _decorate(ax, title: str | None, xlabel: str, ylabel: str, *, percent: bool = False) -> None:
    """Title, axis labels, grid and (when there are labelled lines) a legend."""
    if title:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if percent:
        ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_curves(curves: list[Curves], path: str | Path) -> Path:
    """Figs. 2-3 layout: row 1 accuracy vs steps at the paper's radius, row 2 accuracy vs radius
    (dashed line: the paper's radius); one column per norm, one line per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), squeeze=False)
    for col, norm in enumerate(NORMS):
        top, bottom = axes[0][col], axes[1][col]
        for c in curves:
            if norm in c.steps:
                s = c.steps[norm]
                top.plot(s["steps"], [100 * a for a in s["accuracy"]], marker="o", label=c.model)
            if norm in c.radius:
                r = c.radius[norm]
                bottom.plot(r["radii"], [100 * a for a in r["accuracy"]], marker="o", label=c.model)
        some = next((c for c in curves if norm in c.steps), None)
        if some is not None:
            s, r = some.steps[norm], some.radius[norm]
            top.set_title(f"PGD {NORM_TEX[norm]}, eps {s['eps']:g}, step {s['alpha']:.3g}: accuracy vs steps")
            bottom.set_title(f"PGD {NORM_TEX[norm]}, {r['steps']} steps: accuracy vs radius")
            bottom.axvline(r["eps"], ls="--", c="gray", label=f"paper eps {r['eps']:g}")
        top.set_xscale("log")
        _decorate(top, None, "attack steps (log scale)", "robust accuracy (%)", percent=True)
        _decorate(bottom, None, f"radius eps ({NORM_TEX[norm]})", "robust accuracy (%)", percent=True)
    n = curves[0].n if curves else 0
    fig.suptitle(f"Robust accuracy under PGD (first {n} test images)")
    return _save(fig, path)


def plot_distortion(report: RobustnessReport, path: str | Path, curves: Curves | None = None) -> Path:
    """Accuracy vs allowed distortion for each minimum-norm attack of ``report`` (read from its
    per-example distances) and the PGD radius sweep of ``curves``; one panel per norm."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), squeeze=False)
    for ax, norm in zip(axes[0], NORMS):
        eps = None
        for a in report.attacks:
            if a.norm != norm or a.key not in MINIMUM_NORM or a.distance is None:
                continue
            radii, acc = distortion_curve(report, a.name)
            ax.plot(radii, [100 * v for v in acc], label=a.name.split(" (")[0] + ("†" if a.partial else ""))
            eps = a.eps
        if curves is not None and norm in curves.radius:
            r = curves.radius[norm]
            ax.plot(r["radii"], [100 * v for v in r["accuracy"]], "k--o", ms=3, label=f"PGD ({r['steps']} steps)")
            eps = r["eps"]
        if eps is not None:
            ax.axvline(eps, ls=":", c="gray", label=f"paper eps {eps:g}")
        _decorate(ax, f"{report.model}: {NORM_TEX[norm]} distortion vs accuracy",
                  f"allowed distortion ({NORM_TEX[norm]} norm)", "robust accuracy (%)", percent=True)
    return _save(fig, path)


def _per_epoch(histories: dict[str, list[dict]], key: str, sub: str | None = None):
    for label, hist in histories.items():
        rows = [(h["epoch"], h[key] if sub is None else h[key][sub]) for h in hist
                if h.get(key) is not None and (sub is None or sub in h[key])]
        if rows:
            yield label, [e for e, _ in rows], [v for _, v in rows]


def _member_lines(ax, histories: dict[str, list[dict]], key: str, sub: str | None, norms) -> None:
    """One line per (model, member) of a per-member metric along the epochs."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for label, epochs, values in _per_epoch(histories, key, sub):
        for m in range(len(values[0])):
            name = f"member {m + 1}" + (f" ({norms[m]})" if norms and m < len(norms) else "")
            ax.plot(epochs, [v[m] for v in values], marker="o", label=f"{label}: {name}")


def plot_cross_gradient(histories: dict[str, list[dict]], path: str | Path, norms=None) -> Path:
    """Fig. 1: ||cross gradient|| / ||true gradient|| per member vs epoch (``cross_gradient_ratio``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _member_lines(ax, histories, "cross_gradient_ratio", None, norms)
    _decorate(ax, "Cross gradient vs true gradient during training (MAT Fig. 1)", "epoch",
              r"$\|\nabla_{x_m}\sum_{j\neq m}L_j\|_2 \;/\; \|\nabla_{x_m}L_m\|_2$")
    return _save(fig, path)


def plot_disagreement(histories: dict[str, list[dict]], path: str | Path, norms=None) -> Path:
    """Fig. 4: E_p (fraction of entries where the approximate and true steepest directions
    differ) per member vs epoch, for p = 1 and p = inf (``steepest_disagreement``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), squeeze=False)
    for ax, p in zip(axes[0], ("l1", "linf")):
        _member_lines(ax, histories, "steepest_disagreement", p, norms)
        _decorate(ax, f"Steepest-direction disagreement {E_TEX[p]} (MAT Fig. 4)", "epoch",
                  f"fraction of entries that differ ({NORM_TEX[p]} direction)")
    return _save(fig, path)


def plot_cosine(cosines: dict[str, dict], path: str | Path, norms: dict[str, list] | None = None) -> Path:
    """DML Figs. 9-11: per model (rows), histograms of the per-example cosine similarity of two
    members' input gradients (left) and of their signs (right), one colour per member pair
    (``norms``: per model, the members' training norms for the legend)."""
    plt = _pyplot()
    rows = max(len(cosines), 1)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 3.6 * rows), squeeze=False)
    for r, (label, cos) in enumerate(cosines.items()):
        names = (norms or {}).get(label) or []
        tag = lambda i: f"{i + 1}" + (f" ({names[i]})" if i < len(names) else "")  # noqa: E731
        for c, (key, what) in enumerate((("grad", "input gradients"), ("sign", "signs of the input gradients"))):
            ax = axes[r][c]
            for (i, j), values in zip(cos["pairs"], cos[key]):
                ax.hist(list(values), bins=40, range=(-1, 1), alpha=0.55, label=f"members {tag(i)} - {tag(j)}")
            _decorate(ax, f"{label}: {what}", "cosine similarity between two members", "examples")
    fig.suptitle("Cosine similarity of the members' input gradients, per example (DML paper Figs. 9-11)")
    return _save(fig, path)


def plot_clever(section: dict, path: str | Path, bins: int = 20) -> Path:
    """DML Fig. 1 / A.6: left, histograms of the non-zero CLEVER scores of each model (the
    ``"clever"`` section of a DML report); right, each image's score against the smallest l2
    distance an attack found for it (points above the diagonal: CLEVER exceeds a real adversarial
    distance). Images no attack found anything for are drawn at the right edge."""
    plt = _pyplot()
    radius = section["radius"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    found_max = [d for t in section["models"].values() for d in t["distance"] if d is not None]
    edge = max([radius, *found_max]) * 1.05
    for name, t in section["models"].items():
        scores = [s for s in t["score"] if s is not None and s > 0]
        left.hist(scores, bins=bins, range=(0, radius), alpha=0.55, label=f"{name} ({len(scores)} non-zero)")
        pts = [(edge if d is None else d, s) for s, d in zip(t["score"], t["distance"]) if s is not None]
        right.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, alpha=0.6,
                      label=f"{name} ({t['flagged_count']} above the diagonal)")
    right.plot([0, radius], [0, radius], "k--", lw=1, label="CLEVER = distance found")
    right.axvline(edge, ls=":", c="gray", label="no attack found one")
    images = section["images"]
    _decorate(left, f"Non-zero CLEVER scores, first {images} images (DML Fig. 1)",
              f"CLEVER score ({NORM_TEX['l2']}, radius {radius:g}, summed logits)", "images")
    _decorate(right, "CLEVER vs smallest adversarial distance found",
              f"smallest {NORM_TEX['l2']} distance found (CW ladder, PGD)", "CLEVER score")
    right.legend(fontsize=8, loc="lower right")
    right.set_xlim(0, edge * 1.03)
    return _save(fig, path)


def plot_dml_curves(curves: dict[str, dict], path: str | Path) -> Path:
    """The DML report's distortion-accuracy curves (DML paper, Fig. 18), one panel per model.

    ``curves``: ``{model: {"eps": [...], "accuracy": {attack: [...]}, "long": steps}}`` as
    :func:`pyens.eval.dml.distortion_curve` gives them; accuracy is the majority vote's.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False, sharey=True)
    for ax, (name, c) in zip(axes[0], curves.items()):
        for a, vals in c["accuracy"].items():
            ax.plot(c["eps"], [100 * v for v in vals], marker="o", ms=3, label=a.replace("long", str(c["long"])))
        _decorate(ax, name, "linf eps", "majority-vote accuracy (%)" if ax is axes[0][0] else "", percent=True)
    return _save(fig, path)

