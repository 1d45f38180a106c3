"""Transferability between sub-models (MAT paper Sec. 4.1 and Appendix G, Tables 1-3, 9-12).

Adversarial examples are crafted on each sub-model and on the ensemble; every crafted set is
judged by every sub-model and by the ensemble:

    N_ij = #{examples whose attack crafted on i is misclassified by j}   (out of n)
    r_ij = N_ij / N_ii                                                   (transferability)

The paper counts misclassified examples (clean errors included, its "No attack" row gives
them). Sub-model robustness (Table 3) is each target's robust accuracy under the attack
crafted on itself, with the clean-correctness the Table 4 rows require.

Any ensemble plugs in: a MIMO or :class:`pyens.nn.Ensemble` (``.member(i)`` and an int
``.members``), a training :class:`~pyens.training.Run` (``.members()``), or any object whose
``members`` is a list of classifiers; the ensemble column is judged with
:func:`pyens.eval.robustness.targets` (its averaged output, or a DML ensemble's vote) and
attacked through its differentiable classifier / surrogate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pyens.eval.catalogue import NORMS, preset_params, resolve_radii
from pyens.eval.results import markdown_table, text_table
from pyens.eval.robustness import labelled, predict_labels, targets


def members_of(model) -> list[nn.Module]:
    """The sub-models of an ensemble, each a classifier ``[B, C, H, W] -> [B, K]``: from
    ``.member(i)`` and an int ``.members``, a wrapper's ``.net`` (e.g.
    :class:`pyens.ensembles.ConsensusClassifier`), or a list ``.members`` (or ``.members()``)."""
    m = getattr(model, "members", None)
    if isinstance(m, int) and hasattr(model, "member"):
        return [model.member(i) for i in range(m)]
    if isinstance(m, int) and hasattr(getattr(model, "net", None), "member"):  # a wrapper (a consensus rule)
        return members_of(model.net)
    if callable(m) and not isinstance(m, nn.Module):
        m = m()
    if isinstance(m, (list, tuple, nn.ModuleList)) and len(m):
        return list(m)
    raise ValueError(f"{type(model).__name__} has no sub-models: it needs .member(i) with an int .members, "
                     "or a list .members (or a method .members() returning one)")


@dataclass
class TransferReport:
    """Per-example transfer results of one norm.

    Attributes:
        model: label. norm / eps: the attack's norm and radius. params: its parameters.
        sources / targets: labels (``"Sub-model 1"``, ..., then the ensemble's label).
        wrong: ``[S, T, n]`` bool, target t misclassifies the example crafted on source s.
        clean_wrong: ``[T, n]`` bool, target t misclassifies the clean example.
    """

    model: str
    norm: str
    eps: float
    sources: list[str]
    targets: list[str]
    wrong: torch.Tensor
    clean_wrong: torch.Tensor
    params: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.clean_wrong.shape[-1])

    def counts(self) -> torch.Tensor:
        """``[S, T]`` N_ij."""
        return self.wrong.sum(-1)

    def ratio(self, i: int, j: int) -> float:
        """r_ij = N_ij / N_ii, where ii is source i judged by itself (nan if N_ii = 0)."""
        ii = self.targets.index(self.sources[i])
        c = self.counts()
        return float(c[i, j]) / float(c[i, ii]) if c[i, ii] else float("nan")

    def robust_accuracy(self) -> dict[str, float]:
        """Table 3: each target's robust accuracy under the attack crafted on itself."""
        out = {}
        for j, t in enumerate(self.targets):
            i = self.sources.index(t)
            out[t] = int((~self.clean_wrong[j] & ~self.wrong[i, j]).sum()) / max(self.n, 1)
        return out

    def table(self, *, markdown: bool = False) -> str:
        """Tables 1, 2, 9-12: rows = where the attack was crafted, columns = who judges it;
        cells N_ij with r_ij in parentheses off the diagonal; last row the clean errors."""
        c = self.counts()
        body = []
        for i, s in enumerate(self.sources):
            row = [s]
            for j, t in enumerate(self.targets):
                r = self.ratio(i, j)
                row.append(str(int(c[i, j])) if t == s or r != r else f"{int(c[i, j])} ({100 * r:.1f}%)")
            body.append(row)
        body.append(["No attack"] + [str(int(v)) for v in self.clean_wrong.sum(-1)])
        header = [f"{self.norm} crafted on \\ judged by"] + list(self.targets)
        return markdown_table(header, body) if markdown else text_table(header, body)

    def to_dict(self) -> dict:
        return {"model": self.model, "norm": self.norm, "eps": self.eps, "params": self.params,
                "sources": self.sources, "targets": self.targets, "n": self.n,
                "counts": self.counts().tolist(), "wrong": self.wrong.int().tolist(),
                "clean_wrong": self.clean_wrong.int().tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> TransferReport:
        return cls(d["model"], d["norm"], d["eps"], d["sources"], d["targets"],
                   torch.tensor(d["wrong"], dtype=torch.bool), torch.tensor(d["clean_wrong"], dtype=torch.bool),
                   d.get("params", {}))


def transfer_matrix(model, data, *, norm: str, eps: float, alpha: float, steps: int, k: int = 20,
                    n: int = 1000, batch_size: int = 250, device: str | torch.device = "auto",
                    name: str = "model", ensemble_label: str = "Ensemble", members: list[nn.Module] | None = None,
                    surrogate: nn.Module | None = None, progress: bool = True) -> TransferReport:
    """PGD in ``norm`` crafted on every sub-model and on the ensemble, judged by all of them.

    Args:
        model: the ensemble (see the module docstring); ``members`` overrides its sub-models.
        data: dataset or ``(x, y)``; the first ``n`` examples are used.
        norm, eps, alpha, steps, k: the PGD attack (:class:`pyens.attacks.PGD`, from delta = 0).
    """
    from pyens.attacks import PGD

    subs = members if members is not None else members_of(model)
    predict, attack_model = targets(model, surrogate)
    from pyens.training.distributed import resolve_device

    device = resolve_device(device)
    subs = [m.to(device).eval() for m in subs]
    predict, attack_model = predict.to(device).eval(), attack_model.to(device).eval()
    labels = [f"Sub-model {i + 1}" for i in range(len(subs))] + [ensemble_label]
    judges = subs + [predict]
    crafters = subs + [attack_model]
    x_all, y_all = labelled(data, n)
    bar = None
    if progress:
        from pyens.progress import progress as progress_display

        bar = progress_display(len(crafters) * ((len(x_all) + batch_size - 1) // batch_size),
                               f"transfer {name} {norm}", unit="batch")
    wrong, clean_wrong = [], []
    try:
        for i in range(0, len(x_all), batch_size):
            x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
            clean_wrong.append(torch.stack([predict_labels(j, x) != y for j in judges]).cpu())
            rows = []
            for src in crafters:
                x_adv = PGD(src, norm=norm, eps=eps, alpha=alpha, steps=steps, k=k)(x, y)
                rows.append(torch.stack([predict_labels(j, x_adv) != y for j in judges]).cpu())
                if bar is not None:
                    bar.update(1)
            wrong.append(torch.stack(rows))
    finally:
        if bar is not None:
            bar.close()
    params = {"norm": norm, "eps": eps, "alpha": alpha, "steps": steps, "k": k}
    return TransferReport(name, norm, eps, labels, labels, torch.cat(wrong, -1), torch.cat(clean_wrong, -1), params)


def transfer_tables(model, data, *, dataset: str | None = None, eps=None, pgd: str | dict = "quick",
                    **kwargs) -> list[TransferReport]:
    """:func:`transfer_matrix` for linf, l2 and l1 at the paper's radii of ``dataset`` (default:
    ``data.name``) or at ``eps`` (``{norm: radius}``), with the PGD of ``pgd`` (a preset name, or
    its ``{"pgd_linf": {...}, ...}`` parameters)."""
    dataset = dataset or getattr(data, "name", None)
    radii = resolve_radii(dataset, eps)
    pgd = preset_params(pgd, dataset, radii=eps) if isinstance(pgd, str) else pgd
    return [transfer_matrix(model, data, norm=p, eps=e, alpha=pgd[f"pgd_{p}"]["alpha"], steps=pgd[f"pgd_{p}"]["steps"],
                            k=pgd[f"pgd_{p}"]["k"], **kwargs)
            for p, e in zip(NORMS, radii)]


def submodel_table(reports: list[TransferReport], *, markdown: bool = False) -> str:
    """Table 3: robust accuracy (%) of the ensemble and each sub-model, one row per norm."""
    cols = [reports[0].targets[-1]] + reports[0].targets[:-1]
    body = []
    for r in reports:
        acc = r.robust_accuracy()
        body.append([f"PGD {r.norm} (eps {r.eps:g})"] + [f"{100 * acc[c]:.1f}" for c in cols])
    header = ["Attack"] + cols
    return markdown_table(header, body) if markdown else text_table(header, body)
