"""Robustness reports: per-example results, per-norm and overall worst cases, Table 4 layout.

An example counts as robust to an attack when the model classifies both the clean input and
the attack's output correctly (an attacker may always submit the clean input itself). The
worst cases "All linf", "All l2", "All l1" and "All attacks" are per example: robust only if
robust to every attack of the group (MAT paper, Tables 4-5).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

GROUPS = ("linf", "l2", "l1", "other")
GROUP_TITLES = {"linf": "All linf", "l2": "All l2", "l1": "All l1", "other": "All other"}


@dataclass
class AttackResult:
    """One attack's outcome on the evaluated examples.

    Attributes:
        name: row label, e.g. ``"PGD linf (eps 0.3, 50 steps)"``.
        group: ``"linf" | "l2" | "l1" | "other"`` (the worst case it joins).
        correct: ``[n]`` bool, the model is right on the adversarial example.
        params: the attack's parameters, kept in the JSON.
        seconds: wall-clock time the attack took.
    """

    name: str
    group: str
    correct: torch.Tensor
    params: dict = field(default_factory=dict)
    seconds: float = 0.0


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

    def robust(self, name: str) -> torch.Tensor:
        """``[n]`` bool: robust to the attack called ``name`` (clean-correct and adv-correct)."""
        for a in self.attacks:
            if a.name == name:
                return self.clean & a.correct
        raise KeyError(f"attack {name!r} not in this report; it has {[a.name for a in self.attacks]}")

    def union(self, names) -> torch.Tensor:
        """``[n]`` bool: robust to every attack in ``names`` at once (the per-example worst case)."""
        out = self.clean.clone()
        for name in names:
            out &= self.robust(name)
        return out

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for a in self.attacks:
            out.setdefault(a.group, []).append(a.name)
        return out

    def accuracies(self) -> dict[str, float]:
        """Row label -> accuracy, in the order of the Table 4 layout."""
        rate = lambda mask: int(mask.sum()) / max(self.n, 1)  # noqa: E731 - exact fractions, not float32 means
        rows = {"Clean accuracy": rate(self.clean)}
        groups = self.groups()
        for g in GROUPS:
            if g not in groups:
                continue
            for name in groups[g]:
                rows[name] = rate(self.robust(name))
            if len(groups[g]) > 1 or g != "other":
                rows[GROUP_TITLES[g]] = rate(self.union(groups[g]))
        if self.attacks:
            rows["All attacks"] = rate(self.union([a.name for a in self.attacks]))
        return rows

    # -- output ----------------------------------------------------------------------------
    def table(self) -> str:
        return format_table([self])

    def to_markdown(self) -> str:
        return format_table([self], markdown=True)

    def to_dict(self) -> dict:
        return {"model": self.model, "n": self.n, "meta": self.meta, "accuracy": self.accuracies(),
                "clean": self.clean.int().tolist(),
                "attacks": [{"name": a.name, "group": a.group, "params": a.params, "seconds": a.seconds,
                             "correct": a.correct.int().tolist()} for a in self.attacks]}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> RobustnessReport:
        return cls(d["model"], torch.tensor(d["clean"], dtype=torch.bool),
                   [AttackResult(a["name"], a["group"], torch.tensor(a["correct"], dtype=torch.bool),
                                 a.get("params", {}), a.get("seconds", 0.0)) for a in d["attacks"]],
                   d.get("meta", {}))

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> RobustnessReport:
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        return cls.from_dict(json.loads(p.read_text() if p else str(path_or_text)))


def format_table(reports: list[RobustnessReport], *, markdown: bool = False) -> str:
    """Reports side by side in the layout of the MAT paper's Table 4 (accuracy in %).

    Rows: clean accuracy, then each norm's attacks followed by its per-example worst case,
    then "All attacks"; one column per model.
    """
    rows: list[str] = []
    for r in reports:
        for label in r.accuracies():
            if label not in rows:
                rows.append(label)
    accs = [r.accuracies() for r in reports]
    header = ["Attack"] + [r.model for r in reports]
    body = [[label] + [f"{100 * a[label]:.1f}" if label in a else "-" for a in accs] for label in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(f"**{c}**" if row[0].startswith("All") else c for c in row) + " |"
                  for row in body]
        return "\n".join(lines) + "\n"
    width = max(len(row[0]) for row in body + [header])
    cols = [max(len(str(row[i])) for row in body + [header]) for i in range(1, len(header))]
    fmt = lambda row: f"{row[0]:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(row[1:], cols))  # noqa: E731
    sep = "-" * len(fmt(header))
    return "\n".join([fmt(header), sep] + [fmt(row) for row in body]) + "\n"
