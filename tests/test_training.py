"""pyens.train: methods and their Table 6 pass counts, resume, determinism, DDP, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pyens
from pyens.training import METHODS, TrainConfig, build_network, config_names, count_passes, load_config, load_run
from pyens.training.methods import StepContext, get_method
from pyens.training.run import counted_networks
from pyens.training.schedules import lr_at

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dataset="mnist", model="small_cnn", train_size=40, batch_size=20, epochs=1, steps=2,
            eval_size=20, progress=False)


def _tiny_data():
    return SimpleNamespace(image_shape=(1, 28, 28), num_classes=10, mean=(0.1307,), std=(0.3081,))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_passes_per_batch_equal_table_6(method):
    """Forward/backward passes of one training batch, counted with hooks, in batch-equivalents."""
    k, m, b = 2, 3, 6
    cfg = TrainConfig(method=method, steps=k, members=m).resolved()
    torch.manual_seed(0)
    net = build_network(cfg, _tiny_data())
    ctx = StepContext(net=net, train_net=net, cfg=cfg, generator=torch.Generator().manual_seed(0))
    x, y = torch.rand(b, 1, 28, 28), torch.randint(0, 10, (b,))
    with count_passes(counted_networks(net), b) as count:
        out = get_method(method).loss(ctx, x, y)
        out.loss.backward()
    assert (count.forward, count.backward) == get_method(method).passes(k, cfg.members), method


# The paper's Table 6 (MAT paper), written out here rather than read from Method.passes():
# (forward, backward) per training batch for K steps and M members. dml / dml_at / ensemble are
# the DML paper's methods (M plain members; dml_at adds one FGSM pass per member).
PAPER_TABLE_6 = {
    "standard": lambda k, m: (1, 1),
    "mimo": lambda k, m: (1, 1),
    "at": lambda k, m: (k + 1, k + 1),
    "ensemble_at": lambda k, m: (m * (k + 1), m * (k + 1)),
    "avg": lambda k, m: (m * k + m, m * k + m),
    "max": lambda k, m: (m * k + m, m * k + m),
    "msd": lambda k, m: ((1 + m) * k + 1, k + 1),
    "mimo_at": lambda k, m: (k + 1, m * k + 1),
    "mat": lambda k, m: (k + 1, k + 1),
    "mat_same": lambda k, m: (k + 1, k + 1),
    "mat_msd": lambda k, m: ((1 + m) * k + 1, k + 1),
    "ensemble": lambda k, m: (m, m),
    "dml": lambda k, m: (m, m),
    "dml_at": lambda k, m: (2 * m, 2 * m),
}
VARIANT_SETTINGS = {
    "": {},
    "batch": dict(msd_select="batch", random_start=True, k_range=(5, 20)),  # the MAT authors' adversary
    "batch-fixed-k": dict(msd_select="batch"),
}


@pytest.mark.parametrize("method,variant", [(m, "") for m in sorted(PAPER_TABLE_6)]
                         + [("mat_msd", "batch"), ("mat_msd", "batch-fixed-k"), ("msd", "batch")])
@pytest.mark.parametrize("k", [1, 3])
def test_counted_passes_equal_the_papers_table_6(method, variant, k):
    m, b = 3, 4
    cfg = TrainConfig(method=method, steps=k, members=m, **VARIANT_SETTINGS[variant]).resolved()
    torch.manual_seed(0)
    net = build_network(cfg, _tiny_data())
    ctx = StepContext(net=net, train_net=net, cfg=cfg, generator=torch.Generator().manual_seed(0))
    x, y = torch.rand(b, 1, 28, 28), torch.randint(0, 10, (b,))
    with count_passes(counted_networks(net), b) as count:
        get_method(method).loss(ctx, x, y).loss.backward()
    assert (count.forward, count.backward) == PAPER_TABLE_6[method](k, m)


def test_every_method_has_a_paper_table_6_row():
    assert set(METHODS) == set(PAPER_TABLE_6)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if get_method(m).kind == "mimo"))
def test_mimo_methods_draw_inputs_with_the_configured_repetition(method, monkeypatch):
    import pyens.nn

    seen, real = [], pyens.nn.mimo_batch

    def recording(x, y, members, **kw):
        seen.append(kw.get("repetition"))
        return real(x, y, members, **kw)

    monkeypatch.setattr(pyens.nn, "mimo_batch", recording)
    cfg = TrainConfig(method=method, steps=1, members=3, input_repetition=1.0).resolved()
    torch.manual_seed(0)
    net = build_network(cfg, _tiny_data())
    ctx = StepContext(net=net, train_net=net, cfg=cfg, generator=torch.Generator().manual_seed(0))
    get_method(method).loss(ctx, torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    assert seen == [1.0], method


def test_table_6_formulas_at_k10_m3():
    table = {m: get_method(m).passes(10, 3) for m in METHODS}
    assert table["standard"] == table["mimo"] == (1, 1)
    assert table["at"] == table["mat"] == table["mat_same"] == (11, 11)
    assert table["ensemble_at"] == (33, 33)
    assert table["avg"] == table["max"] == (33, 33)
    assert table["msd"] == table["mat_msd"] == (41, 11)
    assert table["mimo_at"] == (11, 31)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_few_steps(method, tmp_path):
    result = pyens.train(method, out=str(tmp_path / method), **TINY)
    assert len(result.history) == 1 and result.checkpoint.exists()
    rec = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["epoch"] == 1 and 0.0 <= rec["eval_clean_acc"] <= 1.0 and "images_per_s" in rec
    if get_method(method).kind == "mimo" and method != "mimo":
        assert len(rec["cross_gradient_ratio"]) == result.config.members
    run = load_run(tmp_path / method)
    scores = run.classifier(torch.rand(3, 1, 28, 28))
    assert scores.shape == (3, 10) and torch.isfinite(scores).all()


def _params(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_same_seed_same_result(tmp_path):
    a = pyens.train("mat", out=str(tmp_path / "a"), **TINY)
    b = pyens.train("mat", out=str(tmp_path / "b"), **TINY)
    assert torch.equal(_params(a.model), _params(b.model))
    c = pyens.train("mat", out=str(tmp_path / "c"), **{**TINY, "seed": 1})
    assert not torch.equal(_params(a.model), _params(c.model))


@pytest.mark.parametrize("stop_after", [2, 3])  # end of epoch 1 / in the middle of epoch 2
def test_resume_continues_exactly(tmp_path, stop_after):
    cfg = {**TINY, "train_size": 40, "epochs": 2, "random_start": True}
    straight = pyens.train("mat", out=str(tmp_path / "straight"), **cfg)
    pyens.train("mat", out=str(tmp_path / "resumed"), max_steps=stop_after, **cfg)
    resumed = pyens.train("mat", out=str(tmp_path / "resumed"), resume=True, max_steps=0, **cfg)
    assert torch.equal(_params(straight.model), _params(resumed.model))
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in resumed.history]
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_existing_run_is_never_overwritten(tmp_path):
    pyens.train("standard", out=str(tmp_path / "r"), **TINY)
    with pytest.raises(FileExistsError, match="out: .* already holds a run"):
        pyens.train("standard", out=str(tmp_path / "r"), **TINY)
    with pytest.raises(ValueError, match=r"resume: \['lr'\] differ"):
        pyens.train("standard", out=str(tmp_path / "r"), resume=True, lr=0.5, **TINY)
    with pytest.raises(FileNotFoundError, match="resume: .* has no checkpoint.pt"):
        pyens.train("standard", out=str(tmp_path / "none"), resume=True, **TINY)


@pytest.mark.parametrize("bad, match", [
    (dict(method="nope"), "method must be one of"),
    (dict(norms=("l3",)), "norms: each must be one of"),
    (dict(method="at", norms=("l1", "l2")), "norms: method 'at' trains against one norm"),
    (dict(method="mat_same", norms=("l1", "l2")), "norms: method 'mat_same'"),
    (dict(eps=(-1.0,)), "eps must be >= 0, got -1.0"),
    (dict(alpha=(float("inf"),)), "alpha must be finite, got inf"),
    (dict(eps=(1.0, 2.0)), "eps: give one value per norm"),
    (dict(steps=0), "steps must be a positive int; got 0"),
    (dict(members=0), "members must be a positive int; got 0"),
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(optimizer="rmsprop"), "optimizer must be one of"),
    (dict(dataset="imagenet"), "dataset must be one of"),
    (dict(device="tpu"), "device must be"),
    (dict(eps_warmup=-0.5), r"eps_warmup must be in \[0, 1\]"),
    (dict(input_repetition=1.5), r"input_repetition must be in \[0, 1\]"),
    (dict(input_repetition=float("nan")), r"input_repetition must be in \[0, 1\]"),
])
def test_bad_config_names_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad).resolved()


def test_unknown_config_keys_and_files():
    from pyens.training.config import config_from_dict

    with pytest.raises(ValueError, match=r"config: unknown keys \['epoch'\]"):
        config_from_dict({"epoch": 3})
    with pytest.raises(FileNotFoundError, match="config: no file 'nope'"):
        load_config("nope")


def test_shipped_configs_resolve():
    names = config_names()
    assert {"quick-mnist", "mnist-paper", "cifar10-paper"} <= set(names)
    for name in names:
        cfg = load_config(name).resolved()
        assert len(cfg.norms) == len(cfg.eps) == len(cfg.alpha) == cfg.members
    paper = load_config("mnist-paper").resolved()  # Appendix C.1
    assert paper.steps == 100 and paper.norms == ("l1", "l2", "linf")
    assert paper.eps == (10.0, 2.0, 0.3) and paper.alpha == (0.8, 0.1, 0.01)
    cifar = load_config("cifar10-paper").resolved()
    assert (cifar.optimizer, cifar.momentum, cifar.weight_decay, cifar.model) == ("sgd", 0.9, 5e-4, "resnet50")


def test_config_toml_round_trip(tmp_path):
    cfg = load_config("quick-mnist", method="avg").resolved()
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert load_config(tmp_path / "c.toml").resolved() == cfg


def test_default_norms_and_members_follow_the_method():
    assert TrainConfig(method="at").resolved().norms == ("linf",)
    assert TrainConfig(method="mat").resolved().norms == ("l1", "l2", "linf")
    assert TrainConfig(method="mat_same", members=4).resolved().norms == ("linf",) * 4
    assert TrainConfig(method="mimo", members=2).resolved().members == 2
    mnist = TrainConfig(method="mat").resolved()
    assert mnist.eps == (10.0, 2.0, 0.3) and mnist.alpha == (0.8, 0.1, 0.01)  # Appendix C, per norm


def test_schedules_follow_appendix_c():
    total = 1000
    assert lr_at("triangular", 1e-3, 399, total) == pytest.approx(1e-3, rel=1e-2)
    assert lr_at("triangular", 1e-3, total - 1, total) < 1e-5
    assert lr_at("three_phase", 0.1, 799, total) == pytest.approx(0.005, rel=5e-2)
    assert lr_at("three_phase", 0.1, 399, total) == pytest.approx(0.1, rel=1e-2)
    assert lr_at("constant", 0.3, 5, total) == 0.3


def test_ddp_replicas_agree(tmp_path):
    """Two gloo processes under torchrun: the replicas end with identical parameters."""
    import socket

    out = tmp_path / "ddp"
    with socket.socket() as s:  # a free port: a fixed one collides with other runs on the machine
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "pyens", "train", "--method", "mat", "--train-size", "40", "--batch-size", "20", "--epochs", "1",
           "--steps", "1", "--no-eval", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "different parameters" not in proc.stderr
    assert proc.stdout.count("run saved in") == 1  # only rank 0 prints
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_cli_train_then_eval(tmp_path):
    out = tmp_path / "cli"
    common = ["--eval-n", "20", "--eval-steps", "2", "--attacks", "pgd", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "pyens", "train", "--method", "standard", "--train-size", "60",
                           "--epochs", "1", "--out", str(out), *common], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "All attacks" in proc.stdout and "PGD linf (eps 0.3, 2 steps)" in proc.stdout
    saved = json.loads((out / "eval.json").read_text())
    assert saved["n"] == 20 and {a["group"] for a in saved["attacks"]} == {"linf", "l2", "l1"}
    md = tmp_path / "t.md"
    proc = subprocess.run([sys.executable, "-m", "pyens", "eval", str(out), *common, "--markdown", str(md)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert md.read_text().startswith("| Attack | cli |")
    bad = subprocess.run([sys.executable, "-m", "pyens", "eval", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "run_dir:" in bad.stderr


def test_a_new_run_claims_its_directory_at_once(tmp_path, monkeypatch):
    """Two runs started together never share a directory: the claim is config.toml, made
    exclusively before training, not the checkpoint that appears only after an epoch."""
    monkeypatch.chdir(tmp_path)
    starting = tmp_path / "runs" / "standard-mnist-small_cnn-seed0"
    starting.mkdir(parents=True)
    (starting / "config.toml").write_text("")  # claimed by a run still loading its data
    first, second = pyens.train("standard", **TINY), pyens.train("standard", **TINY)
    assert (first.out.name, second.out.name) == ("standard-mnist-small_cnn-seed0-2", "standard-mnist-small_cnn-seed0-3")
    assert (first.out / "checkpoint.pt").exists() and not (starting / "checkpoint.pt").exists()
    # --resume without --out: the newest run
    assert pyens.train("standard", resume=True, max_steps=0, **TINY).out.resolve() == second.out.resolve()
    with pytest.raises(FileExistsError, match="already holds a run"):
        pyens.train("standard", out=str(first.out), **TINY)


def test_resume_checks_max_steps_config_and_checkpoint(tmp_path):
    out = tmp_path / "r"
    pyens.train("standard", out=str(out), max_steps=1, **{**TINY, "epochs": 2})
    # Resuming with the saved max_steps would train one more step each time: say so instead.
    with pytest.raises(ValueError, match=r"max_steps: the run .* stopped at its max_steps \(1\)"):
        pyens.train("standard", out=str(out), resume=True, **{**TINY, "epochs": 2})
    with pytest.raises(ValueError, match=r"resume: \[.*'model'.*\] differ"):  # a config file: all its fields
        pyens.train(config="mnist-paper", out=str(out), resume=True, max_steps=0)
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="checkpoint: .*checkpoint.pt is not a readable checkpoint"):
        pyens.train("standard", out=str(out), resume=True, max_steps=0, **{**TINY, "epochs": 2})


def test_members_flag_that_the_method_overrides_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"members: method 'mat' trains 3 members .*; got 5"):
        pyens.train("mat", members=5, out=str(tmp_path / "m"), **TINY)
    with pytest.raises(ValueError, match=r"members: method 'at' trains 1 member .*; got 3"):
        pyens.train("at", members=3, out=str(tmp_path / "a"), **TINY)
    assert not (tmp_path / "m").exists() and not (tmp_path / "a").exists()


def test_config_paths_and_devices_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="config: no file .*typo/quick-mnist.toml"):
        load_config(tmp_path / "typo" / "quick-mnist.toml")  # never the shipped file of that name
    assert load_config("quick-mnist.toml").method == "mat_msd"  # a bare name still finds the shipped one
    for device in ("cudafoo", "gpu", "cuda:x"):
        with pytest.raises(ValueError, match="device must be"):
            TrainConfig(device=device).resolved()
    from pyens.training.distributed import resolve_device

    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        resolve_device("gpu")


def test_cli_checks_eval_flags_before_training(tmp_path, capsys):
    from pyens.cli import main

    for flag, value in (("--eval-steps", "0"), ("--eval-batch-size", "-1"), ("--eval-n", "0"),
                        ("--eval-device", "gpu")):
        out = tmp_path / flag.strip("-")
        assert main(["train", "--method", "standard", "--train-size", "20", "--epochs", "1", "--no-progress",
                     "--out", str(out), flag, value]) == 2
        assert flag.strip("-").replace("-", "_") in capsys.readouterr().err.replace("-", "_")
        assert not out.exists()  # nothing trained


def test_eval_recovers_from_a_damaged_eval_json(tmp_path, capsys):
    from pyens.cli import main

    out = tmp_path / "run"
    common = ["--eval-n", "10", "--eval-steps", "1", "--attacks", "pgd", "--no-progress"]
    assert main(["train", "--method", "standard", "--train-size", "20", "--epochs", "1", "--out", str(out),
                 *common]) == 0
    whole = (out / "eval.json").read_text()
    (out / "eval.json").write_text(whole[:200])  # a crash while writing, from before writes were atomic
    with pytest.warns(UserWarning, match="eval.json is unreadable"):
        assert main(["eval", str(out), *common]) == 0
    assert json.loads((out / "eval.json").read_text())["n"] == 10
    assert not list(out.glob(".*.tmp"))


def test_train_help_says_what_every_method_trains(capsys):
    from pyens.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for name, method in METHODS.items():
        assert f"{name}  " in text and method.doc.split()[0] in text, name
    assert "paper's text" in METHODS["mat"].doc


def test_cli_rejects_an_unknown_method_listing_the_methods(tmp_path, capsys):
    from pyens.cli import main

    assert main(["train", "--method", "matt", "--out", str(tmp_path / "r"), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "method must be one of" in err and "'mat_msd'" in err and "'matt'" in err


@pytest.mark.parametrize("flag,value,name", [("--msd-select", "mean", "msd_select"), ("--k-range", "9,5", "k_range"),
                                             ("--k-range", "0,5", "k_range"), ("--k-range", "5", "k_range")])
def test_cli_msd_options_are_checked_naming_the_option(tmp_path, capsys, flag, value, name):
    from pyens.cli import main

    out = tmp_path / "r"
    assert main(["train", "--method", "mat_msd", "--out", str(out), "--no-eval", flag, value]) == 2
    assert name in capsys.readouterr().err
    assert not out.exists()


def test_main_job_config_trains_and_prints_the_apgd_table(tmp_path):
    """`pyens train` with no method: the shipped main-job config, a few steps, the table with APGD rows."""
    cfg = load_config("quick-mnist").resolved()
    assert get_method(cfg.method).kind == "mimo" and cfg.members == 3  # the main job stays an ensemble
    out = tmp_path / "main"
    proc = subprocess.run([sys.executable, "-m", "pyens", "train", "--max-steps", "2", "--train-size", "200",
                           "--out", str(out), "--eval-n", "8", "--eval-steps", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("APGD-CE linf (eps 0.3, 100 steps)", "APGD-T linf", "APGD-CE l2", "APGD-T l2", "PGD l1",
                "All attacks"):
        assert row in proc.stdout, row
    assert f"main = {cfg.method}: " in proc.stdout  # the table names what was trained
    saved = load_config(out / "config.toml")
    assert (saved.method, saved.msd_select, saved.input_repetition) == (cfg.method, cfg.msd_select,
                                                                        cfg.input_repetition)
