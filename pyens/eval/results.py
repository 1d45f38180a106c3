"""Robustness reports: per-example results, per-norm and overall worst cases, Table 4 layout.

An example counts as robust to an attack when the model classifies both the clean input and
the attack's output correctly (an attacker may always submit the clean input itself). The
worst cases "All linf", "All l2", "All l1" and "All attacks" are per example: robust only if
robust to every attack of the group (MAT paper, Tables 4-5); "All attacks" takes every attack,
including those outside the three norm groups (e.g. MSD, whose outputs lie in the union of
the three balls).

An attack may have run on a subset of the examples only (an expensive decision-based attack
on a CPU): its own row is then its accuracy on that subset, and in the unions an example it
never saw counts as robust to it, so those unions are upper bounds. Both are marked with a
dagger in the tables, never silently.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

GROUPS = ("linf", "l2", "l1", "other")
GROUP_TITLES = {"linf": "All linf", "l2": "All l2", "l1": "All l1", "other": "All other"}
KINDS = ("white-box", "black-box", "transfer")
PARTIAL = "†"


@dataclass
class AttackResult:
    """One attack's outcome on the evaluated examples.

    Attributes:
        name: row label, e.g. ``"PGD linf (eps 0.3, 50 steps)"``.
        group: ``"linf" | "l2" | "l1" | "other"`` (the worst case it joins).
        correct: ``[n]`` bool, the model is right on the adversarial example (an output
            outside the attack's eps-ball counts as correct: it is not an admissible attack).
        params: the attack's parameters, kept in the JSON.
        seconds: wall-clock time the attack took.
        kind: ``"white-box"`` (gradients of the model or its surrogate), ``"black-box"``
            (decisions only) or ``"transfer"``; the sanity checks compare them.
        norm: the norm its perturbations are measured in (None: a union of balls, e.g. MSD).
        eps: the radius success is judged at (None: no radius).
        distance: ``[n]`` float, ``||x_adv - x||_norm`` where the model is wrong on ``x_adv``,
            ``inf`` where the attack found no adversarial example (or did not run): the
            distortion-accuracy curve of a minimum-norm attack is read from it.
        attacked: ``[n]`` bool, the examples the attack ran on (None: all of them).
        note: how this run differs from the paper's preset (shown in the report).
        key: the catalogue key of the attack (``""`` for attacks from elsewhere).
        parent: for a sub-attack row (AutoAttack's APGD-CE, ...), the row it belongs to.
        broken_by: for AutoAttack, per example the sub-attack that broke it (None: unbroken).
    """

    name: str
    group: str
    correct: torch.Tensor
    params: dict = field(default_factory=dict)
    seconds: float = 0.0
    kind: str = "white-box"
    norm: str | None = None
    eps: float | None = None
    distance: torch.Tensor | None = None
    attacked: torch.Tensor | None = None
    note: str = ""
    key: str = ""
    parent: str = ""
    broken_by: list | None = None

    @property
    def partial(self) -> bool:
        return self.attacked is not None and not bool(self.attacked.all())

    def to_dict(self) -> dict:
        d = {"name": self.name, "group": self.group, "kind": self.kind, "norm": self.norm, "eps": self.eps,
             "params": self.params, "seconds": self.seconds, "note": self.note, "key": self.key,
             "correct": self.correct.int().tolist()}
        if self.distance is not None:
            d["distance"] = [v if math.isfinite(v) else None for v in self.distance.tolist()]
        if self.attacked is not None:
            d["attacked"] = self.attacked.int().tolist()
        if self.parent:
            d["parent"] = self.parent
        if self.broken_by is not None:
            d["broken_by"] = self.broken_by
        return d

    @classmethod
    def from_dict(cls, a: dict) -> AttackResult:
        dist = a.get("distance")
        att = a.get("attacked")
        return cls(a["name"], a["group"], torch.tensor(a["correct"], dtype=torch.bool), a.get("params", {}),
                   a.get("seconds", 0.0), a.get("kind", "white-box"), a.get("norm"), a.get("eps"),
                   None if dist is None else torch.tensor([math.inf if v is None else v for v in dist]),
                   None if att is None else torch.tensor(att, dtype=torch.bool), a.get("note", ""), a.get("key", ""),
                   a.get("parent", ""), a.get("broken_by"))


@dataclass
class RobustnessReport:
    """Per-example results of one model under a set of attacks.

    Attributes:
        model: a label for the model (run name).
        clean: ``[n]`` bool, correct on the clean inputs.
        attacks: the :class:`AttackResult` of each attack, in evaluation order.
        meta: anything worth keeping (dataset, n, device, versions).
    """

    model: str
    clean: torch.Tensor
    attacks: list[AttackResult] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.clean.numel())

    def result(self, name: str) -> AttackResult:
        for a in self.attacks:
            if a.name == name:
                return a
        raise KeyError(f"attack {name!r} not in this report; it has {[a.name for a in self.attacks]}")

    def robust(self, name: str) -> torch.Tensor:
        """``[n]`` bool: robust to the attack called ``name`` (clean-correct and adv-correct;
        an example the attack did not run on counts as robust)."""
        a = self.result(name)
        out = self.clean & a.correct
        return out if a.attacked is None else out | (self.clean & ~a.attacked)

    def union(self, names) -> torch.Tensor:
        """``[n]`` bool: robust to every attack in ``names`` at once (the per-example worst case)."""
        out = self.clean.clone()
        for name in names:
            out &= self.robust(name)
        return out

    def accuracy(self, name: str) -> float:
        """Robust accuracy under one attack, over the examples it ran on."""
        a = self.result(name)
        on = torch.ones_like(self.clean) if a.attacked is None else a.attacked
        return int((self.robust(name) & on).sum()) / max(int(on.sum()), 1)

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for a in self.attacks:
            out.setdefault(a.group, []).append(a.name)
        return out

    def rows(self) -> list[tuple[str, float, bool]]:
        """``(label, accuracy, partial)`` in the order of the Table 4 layout; ``partial`` marks an
        attack run on a subset, or a union that is an upper bound because of one."""
        rate = lambda mask: int(mask.sum()) / max(self.n, 1)  # noqa: E731 - exact fractions, not float32 means
        partial = {a.name: a.partial for a in self.attacks}
        out = [("Clean accuracy", rate(self.clean), False)]
        groups = self.groups()
        for g in GROUPS:
            if g not in groups:
                continue
            for name in groups[g]:
                out.append((name, self.accuracy(name), partial[name]))
            if len(groups[g]) > 1 or g != "other":
                out.append((GROUP_TITLES[g], rate(self.union(groups[g])), any(partial[x] for x in groups[g])))
        if self.attacks:
            out.append(("All attacks", rate(self.union(list(partial))), any(partial.values())))
        return out

    def accuracies(self) -> dict[str, float]:
        """Row label -> accuracy, in the order of the Table 4 layout."""
        return {label: acc for label, acc, _ in self.rows()}

    # -- output ----------------------------------------------------------------------------
    def table(self) -> str:
        return format_table([self])

    def to_markdown(self) -> str:
        return format_table([self], markdown=True)

    def to_dict(self) -> dict:
        return {"model": self.model, "n": self.n, "meta": self.meta, "accuracy": self.accuracies(),
                "clean": self.clean.int().tolist(), "attacks": [a.to_dict() for a in self.attacks]}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            from pyens.atomic_files import atomic_write_text

            atomic_write_text(text, path)  # a later evaluation reads it back as its cache
        return text

    @classmethod
    def from_dict(cls, d: dict) -> RobustnessReport:
        return cls(d["model"], torch.tensor(d["clean"], dtype=torch.bool),
                   [AttackResult.from_dict(a) for a in d["attacks"]], d.get("meta", {}))

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> RobustnessReport:
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        return cls.from_dict(json.loads(p.read_text() if p else str(path_or_text)))


def markdown_table(header: list[str], body: list[list[str]], *, bold=lambda row: False) -> str:
    """A GitHub Markdown table; rows for which ``bold(row)`` holds are set in bold."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"**{c}**" if bold(row) and c else c for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def text_table(header: list[str], body: list[list[str]]) -> str:
    """A fixed-width text table: first column left-aligned, the others right-aligned."""
    width = max(len(row[0]) for row in body + [header])
    cols = [max(len(str(row[i])) for row in body + [header]) for i in range(1, len(header))]
    fmt = lambda row: f"{row[0]:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(row[1:], cols))  # noqa: E731
    sep = "-" * len(fmt(header))
    return "\n".join([fmt(header), sep] + [fmt(row) for row in body]) + "\n"


def format_table(reports: list[RobustnessReport], *, markdown: bool = False) -> str:
    """Reports side by side in the layout of the MAT paper's Table 4 (accuracy in %).

    Rows: clean accuracy, then each norm's attacks followed by its per-example worst case,
    then "All attacks"; one column per model. A dagger marks an attack run on a subset of the
    examples and the unions it makes upper bounds.
    """
    cells = [{label: f"{100 * acc:.1f}" + (PARTIAL if partial else "") for label, acc, partial in r.rows()}
             for r in reports]
    labels = ["Clean accuracy"]  # the Table 4 order over all reports, whatever attacks each one has
    for g in GROUPS:
        names = [n for r in reports for n in r.groups().get(g, [])]
        labels += list(dict.fromkeys(names)) + [GROUP_TITLES[g]]
    labels.append("All attacks")
    labels = [label for label in labels if any(label in c for c in cells)]
    header = ["Attack"] + [r.model for r in reports]
    body = [[label] + [c.get(label, "-") for c in cells] for label in labels]
    if markdown:
        return markdown_table(header, body, bold=lambda row: row[0].startswith("All"))
    return text_table(header, body)
