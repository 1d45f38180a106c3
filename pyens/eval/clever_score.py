"""CLEVER scores (Weng et al. 2018, "Evaluating the Robustness of Neural Networks: An Extreme
Value Theory Approach", ICLR): an *estimate* of the smallest perturbation that changes a
classifier's decision, from sampled gradients. It is not a certificate.

The untargeted score of an input ``x`` of class ``c`` for a model with logits ``g`` is

    CLEVER-u(x) = min over j != c of  min( (g_c(x) - g_j(x)) / L_j ,  R )

where ``L_j`` estimates the largest dual norm ``||grad (g_c - g_j)(x')||_q`` over the ball
``||x' - x||_p <= R`` (``q`` the dual of ``p``: l2 -> l2, linf -> l1, l1 -> linf). By the mean value
theorem, if ``L_j`` really bounded the gradient in the ball, no perturbation shorter than the
score could make ``g_j`` overtake ``g_c``. The estimate of ``L_j``:

1. draw ``pool * samples`` points uniformly in the ball around ``x`` (clipped to the pixel box),
   and compute the dual gradient norm of every margin ``g_c - g_j`` at each point;
2. ``batches`` times, take the maximum of ``samples`` norms drawn from that pool (with
   replacement; ART's ``pool_factor`` scheme);
3. fit a reverse Weibull distribution (maximum likelihood, :func:`reverse_weibull_loc`) to the
   ``batches`` maxima: its location, the right end of its support, is ``L_j``.

Gradient masking (exactly zero or misleading gradients) fools it: Goodfellow (2018),
"Gradient masking causes CLEVER to overestimate adversarial perturbation size". Compare the
scores with the distances real attacks find (:func:`pyens.eval.dml.clever_table` does).

:func:`clever` samples every point of a batch of inputs and every target class in one forward
and ``K + 1`` backward passes per chunk of points; ``backend="art"`` runs the reference,
``art.metrics.clever_u`` of the Adversarial Robustness Toolbox, one input at a time
(``pip install pyens[art]``).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import nn

NORMS = ("l2", "linf", "l1")
# The dual norm of the gradient bounds the change of the margin over a p-ball: 1/p + 1/q = 1.
DUAL = {"l2": 2.0, "linf": 1.0, "l1": math.inf}
THRESHOLDS = (0.2, 1.0, 2.0)
# Range of the reverse Weibull's shape in the fit (see reverse_weibull_loc).
SHAPES = (0.05, 300.0)


@dataclass
class CleverResult:
    """Per-example CLEVER detail (``n`` examples, ``K`` classes).

    score: ``[n]``; NaN where the model gave no gradient (``zero_grad``) and the input is
    correctly classified.
    margin: ``[n, K]`` ``g_c(x) - g_j(x)`` (0 at ``j = c``). lipschitz: ``[n, K]`` the estimated
    max dual gradient norm of each margin over the ball (0 at ``j = c``). zero_grad: ``[n]``
    bool, every sampled gradient of every margin exactly 0. label: ``[n]`` the class ``c``
    scored. settings: the arguments used.
    """

    score: torch.Tensor
    margin: torch.Tensor
    lipschitz: torch.Tensor
    zero_grad: torch.Tensor
    label: torch.Tensor
    settings: dict


def _int_arg(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"clever: {name} must be an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"clever: {name} must be >= {low}, got {v}")
    return int(v)


def _check(x, y, norm, radius, box) -> None:
    if norm not in NORMS:
        raise ValueError(f"clever: norm must be one of {NORMS}, got {norm!r}")
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"clever: radius must be a finite number > 0, got {radius!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"clever: x must be a float tensor [n, ...], got {type(x).__name__}"
                        + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"clever: x must be [n, ...] with n >= 1 and at least one feature dim, got shape "
                         f"{tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("clever: x contains NaN or inf")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"clever: y must be an integer tensor [n] of labels, got "
                            f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
        if y.shape != (len(x),):
            raise ValueError(f"clever: y must have shape [n] = [{len(x)}] like x, got {tuple(y.shape)}")
    if box is not None:
        if len(box) != 2 or not float(box[0]) < float(box[1]):
            raise ValueError(f"clever: box must be None or (low, high) with low < high, got {box!r}")


def sample_ball(n: int, dim: int, norm: str, radius: float, generator: torch.Generator | None = None,
                dtype=torch.float32) -> torch.Tensor:
    """``[n, dim]`` points drawn uniformly in the ``norm`` ball of ``radius`` around 0."""
    if norm == "linf":
        return (torch.rand(n, dim, generator=generator, dtype=dtype) * 2 - 1) * radius
    if norm == "l2":
        # Gaussian direction, radius R U^(1/d): the volume inside radius r grows as r^d.
        d = torch.randn(n, dim, generator=generator, dtype=torch.float64)
        d = d / d.norm(dim=1, keepdim=True)
        r = torch.rand(n, 1, generator=generator, dtype=torch.float64) ** (1.0 / dim)
        return (radius * r * d).to(dtype)
    # l1: d + 1 normalised exponentials are uniform on the simplex; dropping the last gives
    # a point uniform in {v >= 0, sum v <= 1}; random signs fill the other orthants.
    e = -torch.log(torch.rand(n, dim + 1, generator=generator, dtype=torch.float64).clamp_min(1e-300))
    v = e[:, :dim] / e.sum(1, keepdim=True)
    sign = torch.randint(0, 2, (n, dim), generator=generator, dtype=torch.float64) * 2 - 1
    return (radius * v * sign).to(dtype)


def _profile(g: torch.Tensor, top: torch.Tensor, spread: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """Profile log-likelihood ``[r, T]`` of a reverse Weibull at the locations ``top + spread e^log_t``
    (``log_t`` ``[r, T]``), maximised over the shape ``k`` in ``SHAPES`` and the scale."""
    m = g.shape[1]
    y = (top[:, None] + spread[:, None] * torch.exp(log_t))[:, :, None] - g[:, None, :]  # [r, T, m], > 0
    ly = torch.log(y)
    mean_ly = ly.mean(2)
    lo = torch.full_like(mean_ly, math.log(SHAPES[0]))
    hi = torch.full_like(mean_ly, math.log(SHAPES[1]))
    # The shape's likelihood equation h(k) = E_w[log y] - 1/k - mean(log y) = 0 (weights y^k) has
    # h increasing in k: bisection on log k finds its root, or the bound it lies beyond.
    for _ in range(30):
        mid = (lo + hi) / 2
        k = torch.exp(mid)
        w = torch.softmax(k[..., None] * ly, dim=2)
        up = (w * ly).sum(2) - 1 / k - mean_ly > 0
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    k = torch.exp((lo + hi) / 2)
    # with the scale at its optimum (lambda^k = mean y^k): m log k - m log mean(y^k) + (k - 1) sum log y - m
    lse = torch.logsumexp(k[..., None] * ly, dim=2) - math.log(m)
    return m * torch.log(k) - m * lse + (k - 1) * ly.sum(2)


def reverse_weibull_loc(maxima: torch.Tensor, *, chunk: int = 64) -> torch.Tensor:
    """Maximum-likelihood location (right end of the support) of a reverse Weibull fitted to
    each row of ``maxima`` ``[R, m]``; returns ``[R]`` (float64).

    For a location the scale has a closed form and the shape (in :data:`SHAPES`) solves a
    monotone equation (bisection); the profile likelihood is maximised over ``location - max``
    on a log grid from 1e-4 to 1e2 times the sample range, refined twice around the best point.
    With a shape below 1 the likelihood grows without bound as the location approaches the
    sample maximum; the grid's floor stops it at ``max + 1e-4 range``. That is where maxima
    that repeat one top value land (ART's pool scheme draws the pool's largest norm again and
    again), as ART's local optimiser does; a shape held >= 1 instead sent such fits to 4x the
    largest norm seen. Rows whose values are all equal (a linear model: the same gradient
    everywhere) return that value.
    """
    g = maxima.detach().to(torch.float64)
    top, low = g.amax(1), g.amin(1)
    spread = top - low
    out = top.clone()
    rows = torch.nonzero(spread > 1e-9 * top.abs().clamp_min(1e-30)).squeeze(1)
    grid = torch.linspace(math.log(1e-4), math.log(1e2), 61, dtype=torch.float64, device=g.device)
    unit = torch.linspace(-1.0, 1.0, 41, dtype=torch.float64, device=g.device)
    for part in rows.split(chunk):
        gr, tops, sp = g[part], top[part], spread[part]
        log_t, step = grid.expand(len(part), -1), grid[1] - grid[0]
        for _ in range(3):
            best = log_t.gather(1, _profile(gr, tops, sp, log_t).argmax(1, keepdim=True))
            log_t, step = (best + step * unit).clamp(grid[0], grid[-1]), step * 2 / (len(unit) - 1)
        out[part] = tops + sp * torch.exp(best.squeeze(1))
    return out


def _dual_norm(v: torch.Tensor, q: float) -> torch.Tensor:
    return v.norm(p=q, dim=1) if math.isfinite(q) else v.abs().amax(1)


def _grad_norms(model: nn.Module, x: torch.Tensor, c: torch.Tensor, k: int, norm: str) -> torch.Tensor:
    """``[B, K]`` dual norms of ``grad (g_c - g_j)`` at the points ``x`` ``[B, ...]``: one forward
    and ``K + 1`` backward passes through one graph."""
    q = DUAL[norm]
    x = x.detach().requires_grad_(True)
    z = model(x)
    if z.dim() != 2 or z.shape[1] != k:
        raise ValueError(f"clever: model must return logits [B, {k}], got shape {tuple(z.shape)}")
    (gc,) = torch.autograd.grad(z.gather(1, c[:, None]).sum(), x, retain_graph=True)
    gc = gc.flatten(1)
    out = torch.zeros(len(x), k, dtype=torch.float64, device=x.device)
    for j in range(k):
        (gj,) = torch.autograd.grad(z[:, j].sum(), x, retain_graph=j < k - 1)
        out[:, j] = _dual_norm((gc - gj.flatten(1)).double(), q)
    return out


def clever(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, norm: str = "l2",
           radius: float = 2.0, batches: int = 50, samples: int = 20, pool: int = 5,
           box: tuple[float, float] | None = (0.0, 1.0), seed: int = 0, chunk: int = 2000,
           backend: str = "batched", details: bool = False) -> torch.Tensor | CleverResult:
    """Untargeted CLEVER score (CLEVER-u) of every example: an estimate of the smallest
    ``norm`` perturbation that changes ``model``'s top-1 away from ``y``, capped at ``radius``.

    Args:
        model: logits ``[B, ...] -> [B, K]`` (differentiable; pass an ensemble's summed logits,
            e.g. ``ConsensusClassifier(net).surrogate``). Put it in eval mode first.
        x: ``[n, ...]`` float inputs (pixels in ``box``).
        y: ``[n]`` integer labels in ``[0, K)``; the class each score is for. Misclassified
            examples score 0. ``None``: the model's predictions (ART's convention).
        norm: the perturbation norm, ``"l2"`` (the DML paper's), ``"linf"`` or ``"l1"``; the
            gradient is measured in its dual norm.
        radius: the ball sampled, > 0; scores are capped at it.
        batches: number of per-batch gradient-norm maxima the reverse Weibull is fitted to (>= 3).
        samples: gradient norms per batch maximum. pool: the ball is sampled at
            ``pool * samples`` points per example, and each batch draws ``samples`` of them with
            replacement (ART's ``pool_factor``).
        box: sampled points are clipped to ``(low, high)`` (``None``: not clipped).
        seed: seeds the sampling (batched: a ``torch.Generator``; ART: numpy's global RNG).
        chunk: sampled points per forward/backward pass (memory bound).
        backend: ``"batched"`` (this module) or ``"art"`` (``art.metrics.clever_u``, one example
            at a time; needs ``pip install pyens[art]``).
        details: return a :class:`CleverResult` instead of the scores.

    Returns:
        ``[n]`` float64 scores in ``[0, radius]``. A correctly classified example whose every
        sampled margin gradient is exactly 0 gets NaN (and a ``RuntimeWarning``): CLEVER has nothing to
        estimate from there, and such a model masks gradients rather than being robust.
    """
    _check(x, y, norm, radius, box)
    batches, samples, pool = _int_arg("batches", batches, 3), _int_arg("samples", samples, 1), _int_arg("pool", pool, 1)
    chunk = _int_arg("chunk", chunk, 1)
    if backend not in ("batched", "art"):
        raise ValueError(f"clever: backend must be 'batched' or 'art', got {backend!r}")
    settings = dict(norm=norm, radius=float(radius), batches=batches, samples=samples, pool=pool,
                    box=None if box is None else [float(box[0]), float(box[1])], seed=seed, backend=backend)
    with torch.no_grad():
        z0 = torch.cat([model(b) for b in x.split(chunk)]).double()
    if z0.dim() != 2 or len(z0) != len(x):
        raise ValueError(f"clever: model must return logits [n, K], got shape {tuple(z0.shape)}")
    k = z0.shape[1]
    if k < 2:
        raise ValueError(f"clever: model must return at least 2 logits, got {k}")
    pred = z0.argmax(1)
    if y is None:
        c = pred
    else:
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise ValueError(f"clever: y must hold labels in [0, {k}) (the model has {k} outputs); "
                             f"got values from {int(y.min())} to {int(y.max())}")
        c = y.to(x.device).long()
    margin = z0.gather(1, c[:, None]) - z0
    if backend == "art":
        result = _clever_art(model, x, c, pred, margin, k, settings)
    else:
        result = _clever_batched(model, x, c, margin, k, settings, chunk)
    bad = int(torch.isnan(result.score).sum())
    if bad:
        warnings.warn(f"clever: {bad} of {len(x)} examples have an exactly zero gradient of every margin at "
                      f"every sampled point; their scores are NaN (zero gradients mask, they do not certify)",
                      RuntimeWarning, stacklevel=2)
    return result if details else result.score


def _scores(margin: torch.Tensor, lip: torch.Tensor, c: torch.Tensor, radius: float) -> tuple[torch.Tensor, ...]:
    others = torch.ones_like(margin, dtype=torch.bool)
    others[torch.arange(len(c)), c] = False
    zero = (lip == 0) | ~others
    zero_grad = zero.all(1)
    # A margin with zero gradient all over the ball cannot be crossed inside it: that class is
    # out of reach (cap). A non-positive margin is crossed already: score 0.
    per = torch.where(lip > 0, margin / lip.clamp_min(1e-300), torch.full_like(margin, math.inf))
    per = torch.where(margin <= 0, torch.zeros_like(per), per).clamp(max=radius)
    per = torch.where(others, per, torch.full_like(per, math.inf))
    score = per.amin(1)
    score[zero_grad & (score > 0)] = math.nan  # a misclassified input keeps its 0
    return score, zero_grad


def _clever_batched(model, x, c, margin, k, settings, chunk) -> CleverResult:
    norm, radius = settings["norm"], settings["radius"]
    batches, samples, pool, box = settings["batches"], settings["samples"], settings["pool"], settings["box"]
    n, dim, p = len(x), x[0].numel(), pool * samples
    g = torch.Generator().manual_seed(settings["seed"])
    per_chunk = max(1, chunk // p)
    lip = torch.zeros(n, k, dtype=torch.float64, device=x.device)
    for start in range(0, n, per_chunk):
        xb, cb = x[start:start + per_chunk], c[start:start + per_chunk]
        b = len(xb)
        pts = xb[:, None] + sample_ball(b * p, dim, norm, radius, g, x.dtype).to(x.device).view(b, p, *x.shape[1:])
        if box is not None:
            pts = pts.clamp(box[0], box[1])
        pts = pts.reshape(b * p, *x.shape[1:])
        norms = torch.cat([_grad_norms(model, pp, cc, k, norm)
                           for pp, cc in zip(pts.split(chunk), cb.repeat_interleave(p).split(chunk))])
        norms = norms.view(b, p, k).permute(0, 2, 1)  # [b, K, p]
        # batches x samples draws with replacement from each (example, class) pool, as ART does
        idx = torch.randint(0, p, (b, k, batches * samples), generator=g).to(x.device)
        maxima = norms.gather(2, idx).view(b, k, batches, samples).amax(3)
        lip[start:start + b] = reverse_weibull_loc(maxima.reshape(b * k, batches)).view(b, k).to(x.device)
    score, zero_grad = _scores(margin, lip, c, radius)
    return CleverResult(score.cpu(), margin.cpu(), lip.cpu(), zero_grad.cpu(), c.cpu(), settings)


def _art():
    try:
        from art.estimators.classification import PyTorchClassifier
        from art.metrics import clever_u
    except ImportError as e:
        raise ImportError("clever: backend='art' needs the Adversarial Robustness Toolbox: "
                          "pip install 'pyens[art]' (or pip install --no-deps adversarial-robustness-toolbox six)"
                          ) from e
    return PyTorchClassifier, clever_u


def _clever_art(model, x, c, pred, margin, k, settings) -> CleverResult:
    """``art.metrics.clever_u`` per example; ART scores the predicted class, so an example the
    model misclassifies (``pred != y``) scores 0 as in the batched path."""
    import numpy as np

    classifier_cls, clever_u = _art()
    box = settings["box"]
    clf = classifier_cls(model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=k,
                         clip_values=None if box is None else tuple(box), device_type="cpu"
                         if x.device.type == "cpu" else "gpu")
    p = {"l2": 2, "linf": np.inf, "l1": 1}[settings["norm"]]
    np.random.seed(settings["seed"])
    score = torch.zeros(len(x), dtype=torch.float64)
    xs = x.detach().cpu().numpy()
    with warnings.catch_warnings():  # scipy's fit on near-constant maxima (linear models)
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(len(x)):
            if int(pred[i]) != int(c[i]):
                continue
            score[i] = float(clever_u(clf, xs[i], settings["batches"], settings["samples"], settings["radius"], p,
                                      pool_factor=settings["pool"], verbose=False))
    n = len(x)
    nan = torch.full((n, k), math.nan, dtype=torch.float64)
    return CleverResult(score, margin.cpu(), nan, torch.zeros(n, dtype=torch.bool), c.cpu(), settings)


def counts(scores: torch.Tensor, thresholds=THRESHOLDS) -> dict:
    """How many scores are non-zero, at least each threshold (``>= t``: scores are capped at the
    radius, so ``t = radius`` counts the capped ones), NaN (zero gradient), and in all."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    ok = s[~torch.isnan(s)]
    out = {"n": len(s), "nan": int(torch.isnan(s).sum()), "non_zero": int((ok > 0).sum())}
    out.update({f"{t:g}": int((ok >= t).sum()) for t in thresholds})
    return out
