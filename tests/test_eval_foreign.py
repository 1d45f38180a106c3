"""`pyens eval --model`: models trained elsewhere, threat models, user data, AutoAttack's rows."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from pyens.cli import main
from tests.eval_helpers import linear, one_thread  # noqa: F401 - the fixture

MEAN, STD = 0.1307, 0.3081


def tiny(hidden: int = 8) -> nn.Module:
    """The factory `pyens eval --model tests.test_eval_foreign:tiny` builds: MNIST [B, 1, 28, 28] -> [B, 10]."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def self_normalizing() -> nn.Module:
    return SelfNormalizing(tiny(6))


class SelfNormalizing(nn.Module):
    """`tiny` with the normalisation inside: takes pixels in [0, 1]."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x - MEAN) / STD)


EPS = {"linf": 0.05, "l2": 0.5, "l1": 3.0}  # small radii: some examples stay robust, so rows can differ


def _eval(tmp_path, name, *argv):
    out = tmp_path / name
    eps = [] if "--eps" in argv else ["--eps", ",".join(f"{k}={v}" for k, v in EPS.items())]
    code = main(["eval", *argv, *eps, "--n", "8", "--attacks", "pgd", "--steps", "3", "--no-progress",
                 "--out", str(out)])
    assert code == 0
    return json.loads((out / "eval.json").read_text())


@pytest.fixture(scope="module")
def trained():
    """`tiny(6)` trained for 150 steps on the embedded MNIST (about 85% clean accuracy)."""
    from pyens.data import load

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = load("mnist", "train")
    net = tiny(hidden=6)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(150):
        i = torch.randint(0, len(ds), (64,))
        loss = nn.functional.cross_entropy(net(ds.images[i]), ds.labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return net.eval()


@pytest.fixture
def weights(tmp_path, trained):
    net = trained
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    return net, path


def _rows(d):
    return {a["name"]: a["correct"] for a in d["attacks"]}


def test_factory_with_weights_is_evaluated_as_the_model_itself(tmp_path, weights):
    import pyens
    from pyens.data import load

    net, path = weights
    d = _eval(tmp_path, "f", "--model", "tests.test_eval_foreign:tiny", "--weights", str(path),
              "--model-arg", "hidden=6")
    specs = pyens.eval.preset_attacks("pgd", radii=EPS, steps=3)
    direct = pyens.evaluate(net.eval(), load("mnist", "test"), attacks=specs, n=8, progress=False)
    assert d["clean"] == direct.clean.int().tolist() and 0 < sum(d["clean"])
    assert _rows(d) == {a.name: a.correct.int().tolist() for a in direct.attacks}
    assert any(any(a.correct.tolist()) for a in direct.attacks)
    assert d["meta"]["source"]["weights"] == str(path) and d["meta"]["source"]["model_args"] == {"hidden": 6}
    assert d["meta"]["threat"] == EPS
    paper = _eval(tmp_path, "paper", "--model", "tests.test_eval_foreign:tiny", "--weights", str(path),
                  "--model-arg", "hidden=6", "--eps", "linf=0.3")
    assert paper["meta"]["threat"] == {"linf": 0.3}
    assert d["meta"]["examples"] == list(range(8)) and d["meta"]["seed"] == 0
    versions = d["meta"]["versions"]
    assert versions["torch"] == torch.__version__ and versions["pyens"] == pyens.__version__
    assert set(versions) >= {"torchattacks", "foolbox"}


def test_weights_that_do_not_fit_name_the_keys(tmp_path, weights, capsys):
    _, path = weights
    assert main(["eval", "--model", "tests.test_eval_foreign:tiny", "--weights", str(path), "--n", "4",
                 "--no-progress", "--out", str(tmp_path / "x")]) == 2  # hidden 8 != 6
    assert "does not fit" in capsys.readouterr().err
    torch.save({"epoch": 3}, tmp_path / "bad.pt")
    assert main(["eval", "--model", "tests.test_eval_foreign:tiny", "--weights", str(tmp_path / "bad.pt"),
                 "--n", "4", "--no-progress", "--out", str(tmp_path / "x")]) == 2
    assert "without a state dict" in capsys.readouterr().err
    assert main(["eval", "--model", "tests.no_such_module:tiny", "--n", "4", "--out", str(tmp_path / "x")]) == 2
    assert "cannot import" in capsys.readouterr().err


def test_torchscript_and_path_factory_give_the_factorys_results(tmp_path, weights):
    net, path = weights
    want = _eval(tmp_path, "f", "--model", "tests.test_eval_foreign:tiny", "--weights", str(path),
                 "--model-arg", "hidden=6")
    torch.jit.script(net.eval()).save(str(tmp_path / "net.ts"))
    ts = _eval(tmp_path, "ts", "--model", str(tmp_path / "net.ts"))
    assert ts["clean"] == want["clean"] and _rows(ts) == _rows(want)
    assert ts["meta"]["source"]["sha256"]
    by_path = _eval(tmp_path, "p", "--model", f"{__file__}:tiny", "--weights", str(path), "--model-arg", "hidden=6")
    assert _rows(by_path) == _rows(want)


def test_normalize_flag_equals_a_model_that_normalizes_itself(tmp_path, weights):
    net, _ = weights
    torch.save(SelfNormalizing(net).state_dict(), tmp_path / "self.pt")
    inside = _eval(tmp_path, "in", "--model", "tests.test_eval_foreign:self_normalizing",
                   "--weights", str(tmp_path / "self.pt"))
    torch.save(net.state_dict(), tmp_path / "net.pt")
    flag = _eval(tmp_path, "flag", "--model", "tests.test_eval_foreign:tiny", "--model-arg", "hidden=6",
                 "--weights", str(tmp_path / "net.pt"), "--normalize", f"mean={MEAN},std={STD}")
    plain = _eval(tmp_path, "plain", "--model", "tests.test_eval_foreign:tiny", "--model-arg", "hidden=6",
                  "--weights", str(tmp_path / "net.pt"))
    assert flag["clean"] == inside["clean"] and _rows(flag) == _rows(inside)
    assert _rows(plain) != _rows(flag)  # the flag changed what the model sees
    assert flag["meta"]["source"]["normalize"] == {"mean": [MEAN], "std": [STD]}
    assert "--normalize" in flag["meta"]["pixel_space"] and "--normalize" not in plain["meta"]["pixel_space"]


def test_normalize_parsing():
    from pyens.eval.foreign import parse_normalize

    assert parse_normalize("mean=0.5,0.25,0,std=0.5,0.5,1/4") == ((0.5, 0.25, 0.0), (0.5, 0.5, 0.25))
    assert parse_normalize("mnist") == ((0.1307,), (0.3081,))
    for bad in ("mean=0.5", "std=1", "mean=0.5,0.5,std=1", "mean=0.5,std=0", "mean=a,std=1"):
        with pytest.raises(ValueError, match="--normalize"):
            parse_normalize(bad)


# -- threat models ---------------------------------------------------------------------------

def test_eps_parsing_takes_fractions_and_names_bad_input(capsys):
    from pyens.cli import build_parser
    from pyens.eval.threats import parse_number

    def eps(text):
        return build_parser().parse_args(["eval", "run", "--eps", text]).eps

    assert eps("linf=8/255,l2=0.5,l1=12") == {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}
    assert eps("0.3,2/1") == (0.3, 2.0)
    assert parse_number(" 4 / 255 ") == 4 / 255
    for bad, said in (("linf=8/0", "expected numbers or fractions"), ("linf=x", "expected numbers or fractions"),
                      ("lq=1", "expected NORM=VALUE with NORM one of linf, l2, l1, got 'lq=1'"),
                      ("linf=1,linf=2", "linf given twice")):
        with pytest.raises(SystemExit):
            eps(bad)
        assert f"argument --eps: {said}" in capsys.readouterr().err


def test_threat_presets_and_their_attacks():
    from pyens.eval.threats import THREATS, list_threats, threat_model, threat_specs

    assert threat_model("cifar10-leaderboard") == {"linf": 8 / 255, "l2": 0.5}
    assert threat_model("cifar10-leaderboard", {"l1": 12.0, "l2": 1.0}) == {"linf": 8 / 255, "l2": 1.0, "l1": 12.0}
    assert threat_model(eps={"l2": 0.5}) == {"l2": 0.5}
    assert threat_model(dataset="mnist") == {"linf": 0.3, "l2": 2.0, "l1": 10.0}
    with pytest.raises(ValueError, match="did you mean 'cifar10-leaderboard'"):
        threat_model("cifar10-leaderbord")
    with pytest.raises(ValueError, match="--threat .* or --eps"):
        threat_model(dataset="my-images")
    with pytest.raises(ValueError, match="l2 radius"):
        threat_model(eps={"l2": -1.0})
    specs = threat_specs("pgd+apgd", threat_model("cifar10-leaderboard"), "cifar10", steps=10)
    assert {s.norm for s in specs} == {"linf", "l2"} and {s.eps for s in specs} == {8 / 255, 0.5}
    pgd = next(s for s in specs if s.key == "pgd_linf")
    assert pgd.params["alpha"] == pytest.approx(2.5 * (8 / 255) / 10)  # the documented rule
    paper = threat_specs("paper", threat_model(dataset="mnist"), "mnist")
    assert next(s for s in paper if s.key == "pgd_linf").params["alpha"] == 0.01  # the paper's own step
    assert any(s.key == "msd" for s in paper)
    alpha = threat_specs("pgd", {"l1": 12.0}, alpha={"l1": 0.5})
    assert [(s.key, s.params["alpha"]) for s in alpha] == [("pgd_l1", 0.5)]
    with pytest.raises(ValueError, match="no linf radius"):
        threat_specs("pgd", {"l1": 12.0}, alpha={"linf": 0.5})
    leaderboard = threat_specs("autoattack", threat_model("cifar10-leaderboard"), "cifar10")
    assert [(s.key, s.eps, s.params["version"]) for s in leaderboard] == [("autoattack_linf", 8 / 255, "standard"),
                                                                          ("autoattack_l2", 0.5, "standard")]
    listed = list_threats()
    for t in THREATS.values():
        assert t.name in listed and t.source in listed
    assert "8/255" in listed and "RobustBench" in listed


def test_cli_threat_flags(tmp_path, weights, capsys):
    _, path = weights
    assert main(["eval", "--list-threats"]) == 0
    assert "cifar10-leaderboard" in capsys.readouterr().out
    d = _eval(tmp_path, "t", "--model", "tests.test_eval_foreign:tiny", "--weights", str(path), "--model-arg",
              "hidden=6", "--eps", "linf=8/255,l1=5")
    assert d["meta"]["threat"] == {"linf": 8 / 255, "l1": 5.0}
    assert {a["norm"] for a in d["attacks"]} == {"linf", "l1"}
    assert main(["eval", "--model", "tests.test_eval_foreign:tiny", "--eps", "0.1,0.2", "--n", "2",
                 "--out", str(tmp_path / "y")]) == 2
    assert "NORM=VALUE" in capsys.readouterr().err


# -- data ------------------------------------------------------------------------------------

def test_npz_loads_and_names_what_is_wrong(tmp_path):
    from pyens.data import load_npz

    x = np.random.default_rng(0).random((5, 3, 4, 4), dtype=np.float32)
    y = np.array([0, 2, 1, 2, 0])
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    ds = load_npz(tmp_path / "ok.npz")
    assert torch.equal(ds.images, torch.from_numpy(x)) and ds.labels.tolist() == y.tolist() and ds.num_classes == 3
    np.savez(tmp_path / "u8.npz", x=(x * 255).astype(np.uint8), y=y)
    assert torch.allclose(load_npz(tmp_path / "u8.npz").images, torch.from_numpy(x), atol=1 / 255)
    cases = {"no_y": dict(x=x), "last": dict(x=x.transpose(0, 2, 3, 1).repeat(2, 1), y=y),
             "range": dict(x=x * 255, y=y), "norm": dict(x=x - 0.5, y=y), "nan": dict(x=np.full_like(x, np.nan), y=y),
             "fy": dict(x=x, y=y.astype(np.float32)), "ny": dict(x=x, y=y[:3]), "neg": dict(x=x, y=-y - 1),
             "dims": dict(x=x[0], y=y)}
    expect = {"no_y": "no array y", "last": "channels-last", "range": "divide by 255", "norm": "--normalize",
              "nan": "NaN", "fy": "integer", "ny": r"labels \[N=5\]", "neg": ">= 0", "dims": r"\[N, C, H, W\]"}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=expect[name]):
            load_npz(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object), y=y)
    with pytest.raises(ValueError, match="without pickle"):
        load_npz(tmp_path / "obj.npz")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_npz(tmp_path / "missing.npz")


def _png(path, size, value, mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_loads_round_robin_and_checks_sizes(tmp_path):
    from pyens.data import load_image_folder

    for i in range(3):
        _png(tmp_path / "imgs" / "cat" / f"{i}.png", (4, 3), (255, 0, 0))
    _png(tmp_path / "imgs" / "dog" / "0.png", (4, 3), (0, 0, 255))
    ds = load_image_folder(tmp_path / "imgs")
    assert ds.classes == ("cat", "dog") and ds.labels.tolist() == [0, 1, 0, 0]
    assert tuple(ds.images.shape) == (4, 3, 3, 4)
    assert ds.images[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0] and ds.images[1, :, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert len(load_image_folder(tmp_path / "imgs", n=2)) == 2
    _png(tmp_path / "imgs" / "dog" / "1.png", (5, 5), (0, 0, 255))
    with pytest.raises(ValueError, match="1.png is 5x5 but .* --resize"):
        load_image_folder(tmp_path / "imgs")
    assert tuple(load_image_folder(tmp_path / "imgs", size=(6, 7)).images.shape) == (5, 3, 6, 7)
    for i in range(2):
        _png(tmp_path / "gray" / f"c{i}" / "a.png", (2, 2), 128, mode="L")
    assert tuple(load_image_folder(tmp_path / "gray").images.shape) == (2, 1, 2, 2)
    (tmp_path / "gray" / "c1" / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode c1/b.png"):
        load_image_folder(tmp_path / "gray")
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="at least 2"):
        load_image_folder(tmp_path / "one")


def _cifar100(directory, n=4, labels=None):
    import pickle

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = list(range(0, 4 * n, 4)) if labels is None else labels
    with open(directory / "test", "wb") as f:
        pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * n}, f, protocol=2)
    with open(directory / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f, protocol=2)
    return data, labels


def test_cifar100_loads_the_python_format(tmp_path):
    from pyens.data import load

    data, labels = _cifar100(tmp_path / "cifar-100-python")
    ds = load("cifar100", "test", data_dir=tmp_path)
    assert ds.labels.tolist() == labels and ds.classes[12] == "c12" and ds.num_classes == 100
    assert torch.equal(ds.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255)
    _cifar100(tmp_path / "bad", labels=[0, 1, 2, 100])
    with pytest.raises(ValueError, match=r"labels outside 0..99"):
        load("cifar100", "test", data_dir=tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="cifar100 must hold"):
        load("cifar100", "train", data_dir=tmp_path)


def test_eval_on_npz_needs_a_threat_model_and_checks_the_model(tmp_path, weights, capsys):
    _, path = weights
    from pyens.data import load

    mnist = load("mnist", "test")
    np.savez(tmp_path / "d.npz", x=mnist.images[:6].numpy(), y=mnist.labels[:6].numpy())
    argv = ["eval", "--model", "tests.test_eval_foreign:tiny", "--weights", str(path), "--model-arg", "hidden=6",
            "--data", str(tmp_path / "d.npz"), "--n", "6", "--no-progress", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "--threat" in capsys.readouterr().err  # no radii are guessed for foreign data
    d = _eval(tmp_path, "npz", *argv[1:9], "--eps", "linf=0.1")
    assert d["meta"]["dataset"] == "d" and d["n"] == 6
    np.savez(tmp_path / "rgb.npz", x=np.zeros((3, 3, 28, 28), np.float32), y=np.zeros(3, np.int64))
    assert main([*argv[:7], "--data", str(tmp_path / "rgb.npz"), "--eps", "linf=0.1", "--out",
                 str(tmp_path / "o")]) == 2
    assert "the model fails on images of shape (3, 3, 28, 28)" in capsys.readouterr().err


# -- AutoAttack ------------------------------------------------------------------------------

def _aa_specs(**params):
    from pyens.eval import catalogue

    return catalogue("quick", radii={"linf": 0.15, "l2": 0.5, "l1": 2.0}, only=["autoattack_linf"],
                     params={"autoattack_linf": {"steps": 3, "n_queries": 20, **params}})


def test_autoattack_sub_rows_add_up_to_the_autoattack_row():
    import pyens
    from pyens.eval import RobustnessReport

    model = linear()
    torch.manual_seed(1)
    x = torch.rand(16, 1, 8, 8)
    y = model(x).argmax(-1)
    y[:2] = (y[:2] + 1) % 10  # two clean errors
    report = pyens.evaluate(model, (x, y), attacks=_aa_specs(), progress=False)
    parent = report.attacks[0]
    subs = [a for a in report.attacks if a.parent == parent.name]
    assert [a.name.split(" > ")[1] for a in subs] == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    robust = report.robust(parent.name)
    assert 0 < int(robust.sum()) < int(report.clean.sum())  # some broken, some not: the test has teeth
    assert torch.equal(report.union([a.name for a in subs]), robust)
    for i, name in enumerate(parent.broken_by):  # the per-example record names the row that broke it
        if name is None:
            assert robust[i] or not report.clean[i] or all(a.correct[i] for a in subs)
        else:
            assert not next(a for a in subs if a.name.endswith(name)).correct[i]
    assert sum(n is not None for n in parent.broken_by) == int((~parent.correct).sum())
    back = RobustnessReport.from_json(report.to_json())
    assert back.attacks[0].broken_by == parent.broken_by and back.attacks[1].parent == parent.name
    assert back.accuracies() == report.accuracies()


class NoisyLinear(nn.Module):
    """A randomized model (no `randomized` attribute): Gaussian noise on its input at every call."""

    def __init__(self):
        super().__init__()
        self.net = linear()

    def forward(self, x):
        return self.net(x + 0.05 * torch.randn_like(x))


def test_randomized_model_gets_the_rand_version():
    import pyens
    from pyens.eval.autoattack import RAND_NOTE, is_randomized

    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    y = linear()(x).argmax(-1)
    assert is_randomized(NoisyLinear(), x) and not is_randomized(linear(), x)
    report = pyens.evaluate(NoisyLinear(), (x, y), attacks=_aa_specs(steps=2), progress=False)
    parent = report.attacks[0]
    assert "rand version" in parent.name and parent.params["version"] == "rand" and RAND_NOTE in parent.note
    assert [a.name.split(" > ")[1] for a in report.attacks[1:]] == ["APGD-CE (EOT 20)", "APGD-DLR (EOT 20)"]
    assert report.meta["randomized"] is True
    det = pyens.evaluate(linear(), (x, y), attacks=_aa_specs(steps=2), progress=False)
    assert det.attacks[0].params["version"] == "standard" and det.meta["randomized"] is False


def test_rdml_layer_counts_as_randomized():
    from pyens.eval.autoattack import is_randomized
    from pyens.nn import DistanceMap

    layer = DistanceMap(4, 3, randomized=True, seed=0)  # a fixed seed: the same draws, still R-DML
    assert is_randomized(nn.Sequential(nn.Flatten(), layer))
    assert not is_randomized(nn.Sequential(nn.Flatten(), DistanceMap(4, 3)))


# -- precision and summary -------------------------------------------------------------------

def test_autocast_runs_a_precision_check_and_summary_prints_one_line(tmp_path, weights, capsys):
    _, path = weights
    argv = ["eval", "--model", "tests.test_eval_foreign:tiny", "--weights", str(path), "--model-arg", "hidden=6",
            "--n", "6", "--attacks", "pgd", "--steps", "2", "--no-progress", "--out", str(tmp_path / "a"),
            "--autocast", "bf16", "--summary", "--eps", "linf=0.1,l2=1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    d = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert line["clean"] == d["accuracy"]["Clean accuracy"] and line["union"] == d["accuracy"]["All attacks"]
    assert line["per_norm"] == {"linf": d["accuracy"]["All linf"], "l2": d["accuracy"]["All l2"]}
    names = [c["name"] for c in d["meta"]["checks"]]
    assert "low precision not more robust than float32" in names and d["meta"]["autocast"] == "bf16"
    assert line["flags"] == [c["name"] for c in d["meta"]["checks"] if c["passed"] is False]


def test_precision_check_flags_a_gap_and_autocast_lowers_precision():
    from pyens.eval.foreign import Autocast
    from pyens.eval.sanity import precision_agrees

    assert precision_agrees(0.10, 0.11, 1000, "PGD").passed
    bad = precision_agrees(0.10, 0.30, 1000, "PGD")
    assert bad.passed is False and "30.0%" in bad.violations[0]
    assert precision_agrees(0.10, 0.30, 10, "PGD").passed  # on 10 examples the tolerance is 3 / n = 30 points
    torch.manual_seed(0)
    net, x = nn.Linear(64, 10), torch.randn(4, 64)
    low = Autocast(net, torch.bfloat16)(x)
    assert low.dtype == torch.float32 and 0 < (low - net(x)).abs().max() < 0.1


def test_autoattack_cascade_matches_torchattacks_multiattack():
    """The cascade keeps torchattacks' outputs, and its per-example attribution gives
    torchattacks' own per-stage counts."""
    import torchattacks

    from pyens.eval.autoattack import AutoAttackDetail

    model = linear()
    torch.manual_seed(1)
    x = torch.rand(16, 1, 8, 8)
    y = model(x).argmax(-1)
    detail = AutoAttackDetail(model, norm="Linf", eps=0.15, steps=3, n_queries=20)
    ours = detail(x, y)
    subs = detail.attacks(10)
    multi = torchattacks.MultiAttack(subs)
    multi._accumulate_multi_atk_records = True  # torchattacks' per-stage counts, summed into this list
    multi._multi_atk_records = [0.0] * (len(subs) + 1)
    theirs = multi(x, y)
    assert torch.equal(ours, theirs)
    left = multi._multi_atk_records[1:]  # examples still correct after each stage
    assert multi._multi_atk_records[0] == len(x)
    per_stage = [int(a - b) for a, b in zip([len(x), *left], left)]
    counts = [int((detail.broken_by == i).sum()) for i in range(len(left))]
    assert counts == per_stage and sum(counts) > 0 and counts[1:] != [0] * (len(counts) - 1)


def test_exported_program_is_evaluated(tmp_path, weights):
    net, path = weights
    want = _eval(tmp_path, "f", "--model", "tests.test_eval_foreign:tiny", "--weights", str(path),
                 "--model-arg", "hidden=6")
    x = torch.rand(2, 1, 28, 28)
    ep = torch.export.export(net.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, tmp_path / "net.pt2")
    got = _eval(tmp_path, "pt2", "--model", str(tmp_path / "net.pt2"))
    assert got["clean"] == want["clean"] and _rows(got) == _rows(want)
    torch.export.save(torch.export.export(net.eval(), (x,)), tmp_path / "static.pt2")  # batch size fixed at 2
    with pytest.raises(ValueError, match="dynamic_shapes"):
        from pyens.eval.foreign import check_model, load_model

        check_model(load_model(str(tmp_path / "static.pt2"))[0], torch.rand(5, 1, 28, 28), torch.zeros(5).long())


def test_a_second_run_reuses_the_saved_rows_of_the_same_model(tmp_path, weights, monkeypatch):
    import pyens.eval.robustness as robustness

    _, path = weights
    argv = ["--model", "tests.test_eval_foreign:tiny", "--weights", str(path), "--model-arg", "hidden=6"]
    first = _eval(tmp_path, "r", *argv)
    made = []
    real = robustness.AttackResult
    monkeypatch.setattr(robustness, "AttackResult", lambda *a, **k: made.append(a[0]) or real(*a, **k))
    again = _eval(tmp_path, "r", *argv)
    rows = lambda: [m for m in made if "unbounded" not in m]  # noqa: E731 - the sanity check's own PGD always runs
    assert rows() == [] and _rows(again) == _rows(first)  # nothing attacked again
    _eval(tmp_path, "r", *argv, "--seed", "1")
    assert len(rows()) == 3  # another seed: every PGD row runs again
