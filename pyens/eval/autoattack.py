"""AutoAttack (Croce & Hein 2020) sub-attack by sub-attack, and its version for randomized models.

torchattacks' port is the implementation: :class:`AutoAttackDetail` builds
``torchattacks.AutoAttack`` and runs its sub-attacks in its order (standard: APGD-CE, APGD-T,
FAB-T, Square; rand: APGD-CE and APGD-DLR with 20 EOT draws per gradient), each on the examples
the earlier ones left correctly classified, as AutoAttack itself does. It also records, per
example, which sub-attack broke it: :func:`pyens.eval.evaluate` turns that into one row per
sub-attack below the AutoAttack row, and an example breaks under AutoAttack exactly when one of
its sub-attack rows breaks it (the rows' union is the AutoAttack row).

A randomized model (R-DML, AUG-DML, or any model whose output changes between two calls on the
same input) is attacked with the ``rand`` version: gradients of a random model must be averaged
over draws (EOT, Athalye et al. 2018), which APGD with ``eot_iter=20`` does.
"""
from __future__ import annotations

import torch
from torch import nn

from pyens.checks import choice_arg

VERSIONS = ("standard", "plus", "rand")


def torchattacks_version() -> str | None:
    try:
        import torchattacks
    except ImportError:
        return None
    return torchattacks.__version__


def sub_attack_name(atk) -> str:
    """``"APGD-CE"``, ``"APGD-T"``, ``"FAB-T"``, ``"Square"``, ... for a torchattacks attack."""
    kind = type(atk).__name__
    if kind == "APGD":
        name = f"APGD-{atk.loss.upper()}"
    elif kind == "APGDT":
        name = "APGD-T"
    elif kind == "FAB":
        name = "FAB-T" if atk.multi_targeted else "FAB"
    else:
        name = kind
    eot = getattr(atk, "eot_iter", 1)
    return f"{name} (EOT {eot})" if eot > 1 else name


def sub_attack_params(atk) -> dict:
    """What a sub-attack runs with (shown in the report): steps, restarts, queries, EOT draws."""
    keys = ("steps", "n_restarts", "n_queries", "eot_iter", "loss", "n_target_classes")
    return {k: getattr(atk, k) for k in keys if isinstance(getattr(atk, k, None), (int, str))}


class AutoAttackDetail:
    """``torchattacks.AutoAttack(model, norm, eps, version, seed)`` as a cascade of its
    sub-attacks, ``attack(x [B, C, H, W], y [B]) -> x_adv``.

    After each call, ``broken_by`` (``[B]`` int64) holds the index into ``sub_attacks`` (their
    names) of the sub-attack whose output was kept for each example, ``-1`` where none
    fooled the model. ``steps`` / ``n_queries`` override the sub-attacks' iterations and
    Square's queries (default: torchattacks' own; its port runs APGD, APGD-T and FAB with 10
    steps, Square with 5000 queries).
    """

    def __init__(self, model: nn.Module, *, norm: str = "Linf", eps: float, version: str = "standard", seed: int = 0,
                 n_classes: int | None = None, steps: int | None = None, n_queries: int | None = None):
        choice_arg(version, "AutoAttack version", VERSIONS)
        self.model, self.norm, self.eps, self.version, self.seed = model, norm, eps, version, seed
        self.n_classes, self.steps, self.n_queries = n_classes, steps, n_queries
        self.broken_by: torch.Tensor | None = None
        self.sub_attacks: list[str] = []
        self.sub_params: list[dict] = []

    def attacks(self, n_classes: int) -> list:
        """torchattacks' sub-attacks of this AutoAttack version, with the ``steps``/``n_queries`` overrides."""
        try:
            import torchattacks
        except ImportError:
            raise ImportError("AutoAttack runs torchattacks' port: pip install --no-deps torchattacks (its declared "
                              "torchvision dependency is not needed)") from None

        aa = torchattacks.AutoAttack(self.model, norm=self.norm, eps=self.eps, version=self.version,
                                     n_classes=n_classes, seed=self.seed)
        subs = getattr(getattr(aa, "_autoattack", None), "attacks", None)
        if subs is None:
            raise RuntimeError(f"torchattacks {torchattacks.__version__}: AutoAttack has no _autoattack.attacks list "
                               "(pyens reads the sub-attacks from it; torchattacks 3.5 has it)")
        for atk in subs:
            if self.steps is not None and hasattr(atk, "steps"):
                atk.steps = self.steps
            if self.n_queries is not None and hasattr(atk, "n_queries"):
                atk.n_queries = self.n_queries
        return subs

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from pyens.eval.catalogue import count_classes

        subs = self.attacks(self.n_classes or count_classes(self.model, x))
        self.sub_attacks = [sub_attack_name(a) for a in subs]
        self.sub_params = [sub_attack_params(a) for a in subs]
        out = x.clone()
        broken_by = torch.full((len(x),), -1, dtype=torch.int64, device=x.device)
        left = torch.arange(len(x), device=x.device)  # examples every earlier sub-attack failed on
        for i, atk in enumerate(subs):
            adv = atk(x[left], y[left]).detach()
            with torch.no_grad():
                wrong = self.model(adv).argmax(-1) != y[left]
            out[left[wrong]] = adv[wrong]
            broken_by[left[wrong]] = i
            left = left[~wrong]
            if len(left) == 0:
                break
        self.broken_by = broken_by
        return out


def is_randomized(model: nn.Module, x: torch.Tensor | None = None) -> bool:
    """True for a model whose output is random: a pyens layer with ``randomized`` or ``augment``
    set (R-DML, AUG-DML), or, given inputs ``x`` ``[B, C, H, W]``, outputs that differ between
    two calls in eval mode."""
    for m in model.modules():
        if getattr(m, "randomized", False) is True or getattr(m, "augment", False) is True:
            return True
    if x is None:
        return False
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            a, b = model(x), model(x)
    finally:
        model.train(was)
    return not torch.equal(a, b)


RAND_NOTE = "randomized model: AutoAttack's rand version (APGD-CE and APGD-DLR, 20 EOT draws per gradient)"


def for_randomized(specs: list, model: nn.Module, x: torch.Tensor) -> tuple[list, bool]:
    """``(specs, randomized)``: the AutoAttack specs switched to the ``rand`` version when
    ``model`` is randomized (:func:`is_randomized` on inputs ``x``); others unchanged."""
    import dataclasses

    from pyens.eval.catalogue import CATALOGUE

    aa = [s for s in specs if s.key.startswith("autoattack_") and s.params.get("version") == "standard"]
    if not aa or not is_randomized(model, x):
        return specs, False
    out = []
    for s in specs:
        if s in aa:
            p = {k: v for k, v in s.params.items() if k != "eps"}
            p["version"] = "rand"
            name = s.name[:-1] + ", rand version)" if s.name.endswith(")") else s.name + " (rand version)"
            s = dataclasses.replace(s, name=name,
                                    make=CATALOGUE[s.key].build(p, s.eps, None), params={**s.params, "version": "rand"},
                                    note=", ".join(filter(None, [RAND_NOTE, s.note])))
        out.append(s)
    return out, True


def sub_results(parent, broken_by: torch.Tensor, names: list[str], params: list[dict]) -> list:
    """One :class:`~pyens.eval.AttackResult` per sub-attack of the AutoAttack result ``parent``.

    ``broken_by`` ``[n]``: the index into ``names`` of the sub-attack whose output was kept (-1:
    none). A sub-attack's row breaks the examples ``parent`` broke whose output it made, so the
    rows' union is ``parent``'s row. (A randomized model can misclassify at judgment an example
    no sub-attack fooled in the cascade, a fresh draw: that example has no sub-attack.)
    ``parent.broken_by`` is set to the per-example sub-attack names (None: unbroken).
    """
    from pyens.eval.results import AttackResult

    broken = ~parent.correct if parent.attacked is None else ~parent.correct & parent.attacked
    parent.broken_by = [names[i] if b and i >= 0 else None for b, i in zip(broken.tolist(), broken_by.tolist())]
    out = []
    for i, sub in enumerate(names):
        mine = broken & (broken_by == i)
        dist = None if parent.distance is None else torch.where(mine, parent.distance, torch.inf)
        out.append(AttackResult(f"{parent.name} > {sub}", parent.group, ~mine, {"eps": parent.eps, **params[i]}, 0.0,
                                "black-box" if sub == "Square" else "white-box", parent.norm, parent.eps, dist,
                                parent.attacked, f"sub-attack {i + 1} of {len(names)} in AutoAttack's cascade: runs on "
                                "the examples the ones before it left", f"{parent.key}:{sub}", parent=parent.name))
    return out
