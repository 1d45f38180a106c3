"""pyens.attacks: peer equality, constraints, gradients (MAT eq. 5-7), pass counts, arguments.

Models are tiny MLPs trained for a fraction of a second on synthetic 1x8x8 images (three
classes, one faint patch per class in noise; clean accuracy ~97%, CE ~0.06), in float64 so
that comparisons can be tight.
"""
import contextlib
import copy
import math

import pytest
import torch
from torch import nn

from pyens.attacks import (
    BIM,
    FGSM,
    MSD,
    PGD,
    ce_loss,
    cross_gradient_ratio,
    margin_loss,
    mimo_gradient,
    mimo_msd,
    mimo_pgd,
    random_start,
)
from pyens.ops import lp_step
from tests.conftest import assert_close

NORMS = ("linf", "l2", "l1")
EPS = {"linf": 0.1, "l2": 0.6, "l1": 2.0}      # radii for 64-pixel images
ALPHA = {"linf": 0.02, "l2": 0.15, "l1": 0.5}
K_L1 = 4
ORD = {"linf": math.inf, "l2": 2, "l1": 1}
M = 3                                           # MIMO members
CLASSES = 3
TOL = 1e-9                                      # float64 slack on norms and the box
from pyens.ops.lp_step import LP_STEP  # the registered op; its .impl runs once per launch


def make_data(shape, seed):
    """Images ``shape + (1, 8, 8)`` in [0, 1] and labels ``shape``: a bright 2x2 patch per class."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, shape, generator=gen)
    x = 0.6 * torch.rand(*shape, 1, 8, 8, generator=gen, dtype=torch.float64)
    for c, (r, col) in enumerate([(1, 1), (1, 5), (5, 3)]):
        x[..., 0, r:r + 2, col:col + 2] += 0.3 * (y == c).unsqueeze(-1).unsqueeze(-1).double()
    return x.clamp(0, 1), y


class TinyNet(nn.Module):
    """``[B, 1, 8, 8] -> [B, K]``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, CLASSES))

    def forward(self, x):
        return self.body(x)


class TinyMIMO(nn.Module):
    """MIMO stand-in: ``[B, M, 1, 8, 8]`` -> the M inputs concatenated into one shared trunk ->
    M heads ``[B, M, K]``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(M * 64, 32), nn.ReLU(), nn.Linear(32, M * CLASSES))

    def forward(self, x):
        return self.body(x).view(x.shape[0], M, CLASSES)


def train(model, x, y, steps=60):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(steps):
        opt.zero_grad()
        ce_loss(model(x), y).mean().backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return train(TinyNet().double(), *make_data((256,), seed=1))


@pytest.fixture(scope="module")
def mimo():
    torch.manual_seed(1)
    return train(TinyMIMO().double(), *make_data((256, M), seed=2))


@pytest.fixture(scope="module")
def batch():
    return make_data((8,), seed=3)


@pytest.fixture(scope="module")
def mbatch():
    return make_data((6, M), seed=4)


def norms_of(delta, norm, lead=1):
    return delta.flatten(lead).norm(p=ORD[norm], dim=-1)


def check_output(model, x, x_adv, was_training=False):
    """Shape, dtype, box, detached; the model's mode and parameter gradients untouched."""
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training == was_training
    assert all(p.grad is None for p in model.parameters())


@contextlib.contextmanager
def count_passes(model, monkeypatch):
    """Counts forwards (pre-hook), backwards through the model (a hook on its input tensor) and
    lp_step launches (the op's implementation)."""
    n = {"forward": 0, "backward": 0, "lp_step": 0}

    def pre(module, args):
        n["forward"] += 1
        if args[0].requires_grad:
            args[0].register_hook(lambda g: n.__setitem__("backward", n["backward"] + 1))

    impl = LP_STEP.impl

    def counting_impl(*args, **kwargs):
        n["lp_step"] += 1
        return impl(*args, **kwargs)

    monkeypatch.setattr(LP_STEP, "impl", counting_impl)
    handle = model.register_forward_pre_hook(pre)
    try:
        yield n
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# peers

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_sequential_matches_torchattacks(net, batch, norm):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    peer_cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    peer = peer_cls(net, eps=EPS[norm], alpha=ALPHA[norm], steps=12, random_start=False)
    # torchattacks divides the l2 gradient by ||g|| + 1e-10, pyens by max(||g||, 1e-12): on a
    # confident example (||g|| ~ 1e-4) that is a 1e-6 relative difference per step. With the
    # peer's offset removed both compute g / ||g|| (no gradient here is zero).
    peer.eps_for_division = 0.0
    ours = PGD(net, norm=norm, eps=EPS[norm], alpha=ALPHA[norm], steps=12, projection="sequential")(x, y)
    want = peer(x, y)
    assert not torch.equal(want, x)
    assert_close(ours, want, rtol=0, atol=1e-12, what=f"PGD {norm} vs torchattacks")  # rounding only


# ---------------------------------------------------------------------------------------------
# constraints and strength

def single_attacks():
    for norm in NORMS:
        for projection in ("exact", "sequential"):
            for rs in (False, True):
                yield f"pgd-{norm}-{projection}-{'rs' if rs else 'zero'}", norm, {
                    "cls": PGD, "norm": norm, "eps": EPS[norm], "alpha": ALPHA[norm], "steps": 10, "k": K_L1, "random_start": rs,
                    "projection": projection}
    yield "pgd-linf-margin-restarts", "linf", {"cls": PGD, "norm": "linf", "eps": EPS["linf"], "alpha": ALPHA["linf"],
                                                   "steps": 5, "random_start": True, "restarts": 3, "loss": "margin"}
    yield "fgsm", "linf", {"cls": FGSM, "eps": EPS["linf"]}
    yield "bim", "linf", {"cls": BIM, "eps": EPS["linf"], "alpha": ALPHA["linf"], "steps": 10}
    for projection in ("exact", "sequential"):
        yield f"msd-{projection}", None, {"cls": MSD, "eps": [EPS[p] for p in NORMS], "alpha": [ALPHA[p] for p in NORMS],
                                               "steps": 10, "k": K_L1, "projection": projection}


SINGLE = list(single_attacks())


def in_some_ball(delta, norms, lead=1):
    """Per unit: inside at least one of the norms' balls (MSD's union of balls)."""
    ok = torch.zeros(delta.shape[:lead], dtype=torch.bool)
    for p in norms:
        ok |= norms_of(delta, p, lead) <= EPS[p] * (1 + TOL) + TOL
    return ok


@pytest.mark.parametrize("name,norm,spec", [pytest.param(*a, id=a[0]) for a in SINGLE])
def test_single_input_attacks_respect_constraints_and_raise_the_loss(net, batch, name, norm, spec):
    x, y = batch
    spec = dict(spec)
    torch.manual_seed(0)
    x_adv = spec.pop("cls")(net, **spec)(x, y)
    check_output(net, x, x_adv)
    delta = x_adv - x
    if norm is None:
        assert in_some_ball(delta, NORMS).all()
    else:
        assert (norms_of(delta, norm) <= EPS[norm] * (1 + TOL) + TOL).all()
    with torch.no_grad():
        clean, adv = ce_loss(net(x), y), ce_loss(net(x_adv), y)
    assert adv.mean() > clean.mean()
    assert (adv > clean).float().mean() >= 0.75


@pytest.mark.parametrize("variant", ["approx", "naive", "approx-rs", "naive-sequential", "msd", "msd-sequential"])
def test_mimo_attacks_respect_constraints_and_raise_the_loss(mimo, mbatch, variant):
    x, y = mbatch
    torch.manual_seed(0)
    mimo.train()  # no dropout/BN: the mode must just survive the attack
    projection = "sequential" if variant.endswith("sequential") else "exact"
    if variant.startswith("msd"):
        x_adv = mimo_msd(mimo, x, y, eps=[EPS[p] for p in NORMS], alpha=[ALPHA[p] for p in NORMS], steps=10,
                         k=K_L1, projection=projection)
    else:
        x_adv = mimo_pgd(mimo, x, y, norms=NORMS, eps=[EPS[p] for p in NORMS], alpha=[ALPHA[p] for p in NORMS],
                         steps=10, k=K_L1, gradient=variant.split("-")[0], random_start=variant.endswith("rs"),
                         projection=projection)
    check_output(mimo, x, x_adv, was_training=True)
    mimo.eval()
    delta = x_adv - x
    if variant.startswith("msd"):
        assert in_some_ball(delta, NORMS, lead=2).all()
    else:  # member m in its own norm's ball
        for m, p in enumerate(NORMS):
            assert (norms_of(delta[:, m], p) <= EPS[p] * (1 + TOL) + TOL).all(), p
    with torch.no_grad():  # the objective all variants raise: Σ_m L_m per example (eq. 4)
        clean, adv = ce_loss(mimo(x), y).sum(1), ce_loss(mimo(x_adv), y).sum(1)
    assert adv.mean() > clean.mean()
    assert (adv > clean).float().mean() >= 0.75


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_float32(net, batch, norm):
    x, y = (batch[0].float(), batch[1])
    model = copy.deepcopy(net).float()
    x_adv = PGD(model, norm=norm, eps=EPS[norm], alpha=ALPHA[norm], steps=5, k=K_L1, random_start=True)(x, y)
    check_output(model, x, x_adv)
    assert (norms_of(x_adv - x, norm) <= EPS[norm] * (1 + 1e-5) + 1e-6).all()


def test_attacks_run_under_no_grad(net, mimo, batch, mbatch):
    with torch.no_grad():
        x_adv = PGD(net, norm="l2", eps=EPS["l2"], alpha=ALPHA["l2"], steps=2)(*batch)
        m_adv = mimo_pgd(mimo, *mbatch, norms="linf", eps=0.1, alpha=0.05, steps=2)
    assert not torch.equal(x_adv, batch[0]) and not torch.equal(m_adv, mbatch[0])


# ---------------------------------------------------------------------------------------------
# FGSM, BIM, restarts, random start, losses

def input_grad(model, x, y):
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ce_loss(model(xr), y).sum(), xr)
    return g


def test_fgsm_is_one_sign_step_of_size_eps(net, batch):
    x, y = batch
    want = (x + EPS["linf"] * input_grad(net, x, y).sign()).clamp(0, 1)
    assert_close(FGSM(net, eps=EPS["linf"])(x, y), want, rtol=0, atol=1e-15, what="FGSM")


def test_bim_is_linf_pgd_from_x(net, batch):
    x, y = batch
    bim = BIM(net, eps=0.1, alpha=0.03, steps=4)(x, y)
    assert torch.equal(bim, PGD(net, norm="linf", eps=0.1, alpha=0.03, steps=4)(x, y))


@pytest.mark.parametrize("norm", NORMS)
def test_restarts_never_do_worse_than_one_run(net, batch, norm):
    x, y = batch
    kw = {"norm": norm, "eps": EPS[norm], "alpha": ALPHA[norm], "steps": 3, "k": K_L1, "random_start": True}
    torch.manual_seed(5)
    one = PGD(net, **kw)(x, y)
    torch.manual_seed(5)  # the first restart draws the same start as the single run
    many = PGD(net, restarts=4, **kw)(x, y)
    with torch.no_grad():
        out1, outr = net(one), net(many)
    loss1, lossr = ce_loss(out1, y), ce_loss(outr, y)
    fooled1, fooledr = out1.argmax(1) != y, outr.argmax(1) != y
    assert (fooledr | ~fooled1).all()                                       # never loses a success
    assert ((fooledr & ~fooled1) | (lossr >= loss1 - 1e-12)).all()          # else no lower loss


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_random_start_is_uniform_in_the_ball(norm):
    torch.manual_seed(0)
    n, rows = 16, 4000
    x = torch.zeros(rows, n, dtype=torch.float64)
    # a box wide enough never to bind: the projection leaves the draw alone
    d = random_start(x, [norm], [2.0], (-10.0, 10.0), "exact")
    r = norms_of(d, norm) / 2.0
    assert r.max() <= 1 + 1e-12
    # radius law of the uniform distribution on an n-ball: P(r <= t) = t^n, E r = n / (n + 1)
    assert abs(r.mean().item() - n / (n + 1)) < 0.01
    assert abs((r <= 0.9).double().mean().item() - 0.9 ** n) < 0.03
    assert d.mean(0).abs().max() < 0.05                                     # symmetric


def test_margin_loss():
    z = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    assert torch.equal(margin_loss(z, torch.tensor([0, 0])), torch.tensor([-1.0, 3.0]))
    zm = torch.stack([z, z.flip(0)], 1)                                     # [B, M, K] works too
    assert margin_loss(zm, torch.tensor([[0, 0], [0, 0]])).shape == (2, 2)


# ---------------------------------------------------------------------------------------------
# MAT gradients (eq. 5-7)

def member_input_grads(model, x, y):
    """Explicit autograd: G[j] = ∇_x L_j (all slots), L_j = Σ_b CE(z[b, j], y[b, j])."""
    grads = []
    for j in range(M):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(ce_loss(model(xr)[:, j], y[:, j]).sum(), xr)
        grads.append(g)
    return grads


def test_mat_gradient_is_the_sum_of_true_gradients_and_naive_the_own(mimo, mbatch):
    x, y = mbatch
    G = member_input_grads(mimo, x, y)
    approx = mimo_gradient(mimo, x, y, gradient="approx")
    naive = mimo_gradient(mimo, x, y, gradient="naive")
    for m in range(M):
        assert_close(approx[:, m], sum(G[j][:, m] for j in range(M)), rtol=1e-12, atol=1e-15, what=f"approx {m}")
        assert_close(naive[:, m], G[m][:, m], rtol=1e-12, atol=1e-15, what=f"naive {m}")
    cross = approx - naive
    assert cross.abs().max() > 1e-6 * naive.abs().max()                    # the shared trunk couples slots

    # ... and a one-step attack steps each slot with exactly that gradient, in one launch.
    kw = {"norm": list(NORMS), "eps": [EPS[p] for p in NORMS], "alpha": [ALPHA[p] for p in NORMS], "k": K_L1}
    for gradient, g in (("approx", approx), ("naive", naive)):
        want = x + lp_step(torch.zeros_like(x), g, x, members=M, **kw)
        got = mimo_pgd(mimo, x, y, norms=kw["norm"], eps=kw["eps"], alpha=kw["alpha"], k=K_L1, steps=1,
                       gradient=gradient)
        assert_close(got, want.clamp(0, 1), rtol=0, atol=1e-15, what=gradient)


def test_cross_gradient_ratio_matches_autograd(mimo, mbatch):
    x, y = mbatch
    G = member_input_grads(mimo, x, y)
    want = torch.stack([
        (sum(G[j][:, m] for j in range(M) if j != m).flatten(1).norm(dim=1)
         / G[m][:, m].flatten(1).norm(dim=1)).mean()
        for m in range(M)])
    got = cross_gradient_ratio(mimo, x, y)
    assert got.shape == (M,) and (got > 0).all()
    assert_close(got, want, rtol=1e-10, atol=0, what="cross gradient ratio")


# ---------------------------------------------------------------------------------------------
# pass counts (MAT paper, Table 6)

K_STEPS = 4


@pytest.mark.parametrize("case,want", [
    ("pgd", (K_STEPS, K_STEPS, K_STEPS)),
    ("pgd-restarts", (3 * (K_STEPS + 1), 3 * K_STEPS, 3 * K_STEPS)),
    ("fgsm", (1, 1, 1)),
    ("msd", ((1 + 3) * K_STEPS, K_STEPS, 3 * K_STEPS)),
    ("mimo-approx", (K_STEPS, K_STEPS, K_STEPS)),
    ("mimo-naive", (K_STEPS, M * K_STEPS, K_STEPS)),
    ("mimo-msd", ((1 + 3) * K_STEPS, K_STEPS, 3 * K_STEPS)),
])
def test_forward_backward_and_launch_counts(net, mimo, batch, mbatch, monkeypatch, case, want):
    eps, alpha = [EPS[p] for p in NORMS], [ALPHA[p] for p in NORMS]
    model = mimo if case.startswith("mimo") else net
    with count_passes(model, monkeypatch) as n:
        if case == "pgd":
            PGD(net, norm="l1", eps=2.0, alpha=0.5, steps=K_STEPS, k=K_L1)(*batch)
        elif case == "pgd-restarts":
            PGD(net, norm="l2", eps=0.6, alpha=0.15, steps=K_STEPS, random_start=True, restarts=3)(*batch)
        elif case == "fgsm":
            FGSM(net, eps=0.1)(*batch)
        elif case == "msd":
            MSD(net, eps=eps, alpha=alpha, steps=K_STEPS, k=K_L1)(*batch)
        elif case == "mimo-msd":
            mimo_msd(mimo, *mbatch, eps=eps, alpha=alpha, steps=K_STEPS, k=K_L1)
        else:
            mimo_pgd(mimo, *mbatch, norms=NORMS, eps=eps, alpha=alpha, steps=K_STEPS, k=K_L1,
                     gradient=case.split("-")[1])
    assert (n["forward"], n["backward"], n["lp_step"]) == want


# ---------------------------------------------------------------------------------------------
# MSD keeps the best candidate over all steps

def test_msd_returns_the_best_candidate_over_all_steps(net, batch):
    x, y = batch
    seen = []
    handle = net.register_forward_hook(lambda mod, args, out: seen.append(ce_loss(out.detach(), y)))
    try:
        # large steps so that the loss of the chosen candidate goes down again at some step
        x_adv = MSD(net, eps=[EPS[p] for p in NORMS], alpha=[3 * EPS["linf"], EPS["l2"], EPS["l1"]], steps=6,
                    k=K_L1)(x, y)
    finally:
        handle.remove()
    assert len(seen) == 6 * (1 + 3)
    recorded = torch.stack(seen).view(6, 1 + 3, -1)    # per step: gradient forward, 3 candidates
    best = recorded.flatten(0, 1).max(0).values
    last = recorded[-1, 1:].max(0).values               # the candidate chosen at the last step
    assert (last < best - 1e-9).any()                   # so keeping the last iterate would lose
    with torch.no_grad():
        final = ce_loss(net(x_adv), y)
    assert (final >= best - 1e-12).all()                # >= the loss at every recorded step
    assert_close(final, best, rtol=1e-12, atol=1e-12, what="best over steps")


# ---------------------------------------------------------------------------------------------
# argument checks

def bad_calls(net, mimo, batch, mbatch):
    x, y = batch
    mx, my = mbatch
    pgd = {"norm": "linf", "eps": 0.1, "alpha": 0.01, "steps": 2}
    msd = {"eps": [0.1, 0.5, 2.0], "alpha": [0.01, 0.1, 0.5], "steps": 2}
    mpgd = {"norms": NORMS, "eps": [0.1, 0.5, 2.0], "alpha": [0.01, 0.1, 0.5], "steps": 2}
    yield "norm", lambda: PGD(net, **{**pgd, "norm": "l3"})
    yield "eps", lambda: PGD(net, **{**pgd, "eps": -0.1})
    yield "alpha", lambda: PGD(net, **{**pgd, "alpha": -1.0})
    yield "steps", lambda: PGD(net, **{**pgd, "steps": 0})
    yield "restarts", lambda: PGD(net, **pgd, restarts=0)
    yield "k", lambda: PGD(net, **pgd, k=0)
    yield "loss", lambda: PGD(net, **pgd, loss="hinge")
    yield "projection", lambda: PGD(net, **pgd, projection="nearest")
    yield "box", lambda: PGD(net, **pgd, box=(1, 0))
    yield "y must be", lambda: PGD(net, **pgd)(x, y.unsqueeze(1))
    yield "x must lie in the box", lambda: PGD(net, **pgd)(x + 2, y)
    yield "model must return", lambda: PGD(mimo, **pgd)(mx, my[:, 0])
    yield "eps", lambda: FGSM(net, eps=-1)
    yield "steps", lambda: BIM(net, eps=0.1, alpha=0.01, steps=0)
    yield r"norms\[1\]", lambda: MSD(net, **{**msd, "norms": ("linf", "lp", "l1")})
    yield "eps", lambda: MSD(net, **{**msd, "eps": [0.1, 0.5]})
    yield "steps", lambda: MSD(net, **{**msd, "steps": 0})
    yield "norms", lambda: mimo_pgd(mimo, mx, my, **{**mpgd, "norms": ("linf", "l2")})
    yield "alpha", lambda: mimo_pgd(mimo, mx, my, **{**mpgd, "alpha": [0.1] * 4})
    yield r"eps\[2\]", lambda: mimo_pgd(mimo, mx, my, **{**mpgd, "eps": [0.1, 0.5, -2.0]})
    yield "steps", lambda: mimo_pgd(mimo, mx, my, **{**mpgd, "steps": 0})
    yield "gradient", lambda: mimo_pgd(mimo, mx, my, **mpgd, gradient="exact")
    yield "y must be", lambda: mimo_pgd(mimo, mx, my[:, 0], **mpgd)
    yield "alpha", lambda: mimo_msd(mimo, mx, my, **{**msd, "alpha": [0.1, 0.2]})
    yield "y must be", lambda: cross_gradient_ratio(mimo, mx, my[:2])
    yield "delta must", lambda: mimo_gradient(mimo, mx, my, delta=mx[:, :2])
    nan_x = x.clone()
    nan_x[0, 0] = float("nan")
    yield "x must be finite", lambda: PGD(net, **pgd)(nan_x, y)
    yield "y must hold class labels >= 0", lambda: PGD(net, **pgd)(x, torch.full_like(y, -100))
    yield r"y must hold class labels in \[0, 3\)", lambda: PGD(net, **pgd)(x, torch.full_like(y, CLASSES))
    yield r"y must hold class labels in \[0, 3\)", lambda: MSD(net, **msd)(x, torch.full_like(y, CLASSES))
    yield "y must hold class labels >= 0", lambda: mimo_pgd(mimo, mx, my - 200, **mpgd)
    yield "restarts=3 needs random_start=True", lambda: PGD(net, **pgd, restarts=3)
    yield "delta must be finite", lambda: mimo_gradient(mimo, mx, my, delta=torch.full_like(mx, float("nan")))


BAD = ["norm", "eps", "alpha", "steps", "restarts", "k", "loss", "projection", "box", "y-shape", "x-box",
       "model-output", "fgsm-eps", "bim-steps", "msd-norms", "msd-eps-length", "msd-steps", "mimo-norms-length",
       "mimo-alpha-length", "mimo-eps-negative", "mimo-steps", "mimo-gradient", "mimo-y-shape",
       "mimo-msd-alpha-length", "ratio-y-shape", "gradient-delta-shape", "x-nan", "y-ignore-index",
       "y-too-large", "msd-y-too-large", "mimo-y-negative", "restarts-without-random-start", "gradient-delta-nan"]


@pytest.mark.parametrize("index", range(len(BAD)), ids=BAD)
def test_bad_arguments_raise_value_errors_naming_them(net, mimo, batch, mbatch, index):
    match, call = list(bad_calls(net, mimo, batch, mbatch))[index]
    with pytest.raises(ValueError, match=match):
        call()


def test_attacks_reject_a_non_bool_random_start_and_inference_mode(net, mimo, batch, mbatch):
    x, y = batch
    with pytest.raises(TypeError, match="random_start must be True or False"):
        PGD(net, norm="l2", eps=0.5, alpha=0.1, steps=2, random_start="no")
    with pytest.raises(TypeError, match="random_start must be True or False"):
        mimo_pgd(mimo, *mbatch, norms=NORMS, eps=[0.1, 0.5, 2.0], alpha=[0.01, 0.1, 0.5], steps=2, random_start=1)
    with pytest.raises(TypeError, match="delta must match x's dtype"):
        mimo_gradient(mimo, *mbatch, delta=torch.zeros_like(mbatch[0], dtype=torch.float32))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="not torch.inference_mode"):
        PGD(net, norm="linf", eps=0.1, alpha=0.05, steps=2)(x, y)
    with torch.no_grad():  # the documented way to call an attack from an evaluation loop
        PGD(net, norm="linf", eps=0.1, alpha=0.05, steps=2)(x, y)


@pytest.mark.parametrize("norm", NORMS)
def test_random_start_handles_an_empty_batch(net, mimo, batch, mbatch, norm):
    x, y = batch
    out = PGD(net, norm=norm, eps=EPS[norm], alpha=ALPHA[norm], steps=2, random_start=True)(x[:0], y[:0])
    assert out.shape == x[:0].shape
    mx, my = mbatch
    out = mimo_pgd(mimo, mx[:0], my[:0], norms=NORMS, eps=[EPS[n] for n in NORMS], alpha=[ALPHA[n] for n in NORMS],
                   steps=2, random_start=True)
    assert out.shape == mx[:0].shape
