"""The CLI and the API agree with each other and explain themselves (issue 16, section 4)."""
from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import pyens
from pyens.cli import build_parser, main
from pyens.training import TrainConfig, load_config
from tests.eval_helpers import one_thread  # noqa: F401 (autouse fixture)

TINY = ["--method", "standard", "--train-size", "40", "--batch-size", "20", "--epochs", "1"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


# ---------------------------------------------------------------------------------------------
# help, version, typos

@pytest.mark.parametrize("command", ["train", "eval", "report", "dml-report"])
def test_every_flag_has_help_with_its_default_and_choices(command):
    parser = _subparsers()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue  # -h, and the deprecated spellings (named in the description)
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{command} {name} has no help"
        text = formatter._expand_help(action)
        if action.option_strings and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in text, f"{command} {name}: no default in {text!r}"
        for choice in action.choices or ():
            assert str(choice) in text or str(choice) in parser.format_usage(), (command, name, choice)


def test_train_help_names_every_method_and_the_unit_of_eps():
    from pyens.training import METHODS

    text = _subparsers()["train"].format_help()
    for name in METHODS:
        assert name in text
    assert "pixel units" in text and "linf=0.3,l2=2,l1=10" in text and "quick-mnist: 6" in text  # epochs


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"pyens {pyens.__version__} (torch ")


def test_a_typo_gets_the_closest_valid_name(capsys):
    with pytest.raises(SystemExit):
        main(["trian"])
    assert "did you mean 'train'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--methd", "mat"])
    err = capsys.readouterr().err
    assert "--methd (did you mean --method?)" in err
    assert err.startswith("usage: pyens train ") and "pyens train: error:" in err  # the subcommand's usage
    with pytest.raises(SystemExit):
        main(["eval", "run", "--attacks", "pgd+apdg"])
    assert "did you mean 'pgd+apgd'?" in capsys.readouterr().err
    assert main(["train", "--method", "mat_mds", "--no-eval"]) == 2
    assert "did you mean 'mat_msd'?" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# --eps and --alpha

def _args(*argv):
    return build_parser().parse_args(["train", *argv])


def test_eps_and_alpha_take_the_config_files_per_norm_syntax():
    args = _args("--eps", "linf=0.3,l2=2,l1=10", "--alpha", "l1=1.5")
    assert args.eps == {"linf": 0.3, "l2": 2.0, "l1": 10.0} and args.alpha == {"l1": 1.5}
    # Over the config's table, only the norms named change.
    cfg = load_config("quick-mnist", eps={"linf": 0.2}, alpha=args.alpha).resolved()
    assert cfg.norms == ("l1", "l2", "linf")
    assert cfg.eps == (10.0, 2.0, 0.2) and cfg.alpha == (1.5, 0.5, 0.075)
    for bad in ("linf=0.3,l3=1", "linf=x", "linf=0.1,linf=0.2"):
        with pytest.raises(SystemExit):
            _args("--eps", bad)


def test_a_bare_list_follows_the_order_of_the_norms():
    args = _args("--norms", "linf,l2,l1", "--eps", "0.3,2,10")
    assert args.eps == (0.3, 2.0, 10.0)
    cfg = TrainConfig(method="mat", norms=args.norms, eps=args.eps).resolved()
    assert dict(zip(cfg.norms, cfg.eps)) == {"linf": 0.3, "l2": 2.0, "l1": 10.0}


def test_one_number_for_several_norms_is_an_error_showing_the_per_norm_syntax(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"eps: one value \(0.3\) for members of different norms .*linf="):
        TrainConfig(method="mat", eps=(0.3,)).resolved()
    out = tmp_path / "r"
    assert main(["train", *TINY, "--method", "mat", "--eps", "0.3", "--no-eval", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--eps l1=10,l2=2,linf=0.3" in err and "eps = { l1 = 10, l2 = 2, linf = 0.3 }" in err
    assert not out.exists()
    # One norm for every member: one number is unambiguous.
    assert TrainConfig(method="mat_same", norms=("linf",), eps=(0.1,)).resolved().eps == (0.1, 0.1, 0.1)


# ---------------------------------------------------------------------------------------------
# defaults and names agree

def test_evaluate_defaults_to_pyens_evals_preset_and_auto_device():
    from pyens.eval import evaluate
    from pyens.eval.run_report import Settings, evaluate_run
    from pyens.training import load_run

    ev = _subparsers()["eval"]
    assert inspect.signature(evaluate).parameters["attacks"].default == ev.get_default("attacks") == "pgd+apgd"
    assert inspect.signature(evaluate_run).parameters["attacks"].default == "pgd+apgd"
    for fn in (evaluate, evaluate_run, load_run):
        assert inspect.signature(fn).parameters["device"].default == "auto", fn
    assert Settings().device == "auto" and ev.get_default("eval_device") == "auto"


def test_pyens_eval_and_evaluate_build_the_same_attacks(tmp_path, monkeypatch):
    """`pyens eval` and `pyens.evaluate(attacks="pgd+apgd")` go through one function."""
    from pyens.eval import run_report
    from pyens.eval.robustness import resolve_attacks

    seen = {}

    def fake_evaluate_run(run_dir, *, attacks, **kwargs):
        seen["specs"] = attacks("mnist")
        raise KeyboardInterrupt  # stop here: nothing to evaluate

    monkeypatch.setattr(run_report, "evaluate_run", fake_evaluate_run)
    for argv, kwargs in ((["eval", "run"], {}), (["eval", "run", "--steps", "7", "--restarts", "2"],
                                                  dict(steps=7, restarts=2))):
        assert main(argv) == 130
        api = resolve_attacks("pgd+apgd", "mnist", **kwargs)
        assert [(s.name, s.params, s.note) for s in seen["specs"]] == [(s.name, s.params, s.note) for s in api]
    assert [s.key for s in api] == ["pgd_linf", "pgd_l2", "pgd_l1", "apgd_ce_linf", "apgd_t_linf", "apgd_ce_l2",
                                    "apgd_t_l2"]
    assert api[0].params["steps"] == 7 and api[0].params["random_start"] is True
    with pytest.raises(ValueError, match="steps and restarts set PGD's"):
        resolve_attacks("quick", "mnist", steps=7)


def test_eval_spells_its_options_as_report_does(capsys):
    parsers = _subparsers()
    ev = parsers["eval"].parse_args(["r", "--n", "7", "--batch-size", "3", "--device", "cpu", "--steps", "2"])
    rp = parsers["report"].parse_args(["r", "--n", "7", "--batch-size", "3", "--device", "cpu"])
    assert (ev.eval_n, ev.eval_batch_size, ev.eval_device, ev.eval_steps) == (7, 3, "cpu", 2)
    assert (rp.n, rp.batch_size, rp.device) == (7, 3, "cpu")
    old = parsers["eval"].parse_args(["r", "--eval-n", "9", "--eval-steps", "4"])  # the old spelling still works
    assert (old.eval_n, old.eval_steps) == (9, 4)
    assert "--eval-n is deprecated; use --n" in capsys.readouterr().err


def test_train_result_and_load_run_call_the_network_model(tmp_path):
    out = tmp_path / "run"
    result = pyens.train("standard", out=str(out), train_size=20, batch_size=20, epochs=1, progress=False)
    run = pyens.load_run(out)
    assert isinstance(result.model, nn.Module) and isinstance(run.model, nn.Module)
    assert run.net is run.model and result.net is result.model  # the old name stays an alias
    assert torch.equal(next(run.model.parameters()).cpu(), next(result.model.parameters()).cpu())


# ---------------------------------------------------------------------------------------------
# radii

def _rgb_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()


def test_evaluate_never_guesses_the_radii_of_foreign_data():
    from pyens.eval import evaluate, pgd_specs

    model, x = _rgb_model(), torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\) is not a pyens dataset.*dataset=.*eps="):
        evaluate(model, (x, y), attacks="pgd", progress=False)
    radii = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}
    rep = evaluate(model, (x, y), attacks="pgd", eps=radii, n=4, progress=False)
    assert [a.eps for a in rep.attacks] == [8 / 255, 0.5, 12.0]
    assert rep.meta["radii"] == radii
    rep = evaluate(model, (x, y), attacks="pgd", dataset="cifar10", n=4, progress=False)
    assert [a.eps for a in rep.attacks] == [0.03, 0.5, 12.0]
    with pytest.raises(ValueError, match=r"eps: no radius for \['l1'\]"):
        evaluate(model, (x, y), attacks="pgd", eps={"linf": 0.1, "l2": 0.5}, progress=False)
    # pgd_specs takes radii, and no longer falls back to MNIST's.
    assert [s.eps for s in pgd_specs(radii=radii)] == [8 / 255, 0.5, 12.0]
    with pytest.raises(ValueError, match="dataset="):
        pgd_specs()


# ---------------------------------------------------------------------------------------------
# the run directory of a failed start, progress lines, the max_steps summary, ranks

def test_a_failed_start_does_not_lock_its_run_directory(tmp_path, capsys):
    out = tmp_path / "X"
    assert main(["train", *TINY, "--dataset", "cifar10", "--data-dir", str(tmp_path / "nonexistent"),
                 "--out", str(out), "--no-eval", "--no-progress"]) == 2
    assert "cifar" in capsys.readouterr().err
    assert not out.exists()  # nothing claimed: --out X is free again
    assert main(["train", *TINY, "--out", str(out), "--max-steps", "1", "--no-eval", "--no-progress"]) == 0
    kept = tmp_path / "kept"  # a directory that was there before keeps existing, without a claim
    kept.mkdir()
    with pytest.raises(FileNotFoundError):
        pyens.train("standard", dataset="cifar10", data_dir=str(tmp_path / "nonexistent"), out=str(kept),
                    progress=False)
    assert kept.is_dir() and not list(kept.iterdir())


def test_train_in_a_log_writes_lines_not_bar_frames(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pyens", "train", *TINY, "--out", str(tmp_path / "r"),
                           "--no-eval"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr
    assert "standard mnist: 2/2 batch (100%)" in proc.stderr


def test_a_max_steps_stop_is_reported_with_its_step(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "2", "--max-steps", "3", "--out", str(out), "--no-eval",
                 "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "training stopped early at step 3 of 4 (max_steps 3), in epoch 2 of 2" in said
    assert f"--resume --out {out}" in said
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "full"), "--no-eval",
                 "--no-progress"]) == 0
    assert "stopped early" not in capsys.readouterr().out


def test_only_rank_0_prints(monkeypatch, capsys, tmp_path):
    import pyens.training

    result = SimpleNamespace(out=tmp_path, checkpoint=tmp_path / "checkpoint.pt", history=[], replicas_agree=True,
                             stopped_at=None, config=None, total_steps=1)
    monkeypatch.setattr(pyens.training, "train", lambda **kwargs: result)
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--no-progress"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--no-progress", "--no-eval"]) == 0
    assert "run saved in" in capsys.readouterr().out


def test_train_flags_are_derived_from_the_config_fields(capsys):
    """Issue 21: `pyens train`'s flags are TrainConfig's fields that carry CLI metadata, with the
    field's own help text; no hand-kept copy can drift."""
    from pyens.cli import build_parser
    from pyens.training.config import TrainConfig, cli_fields

    fields = cli_fields()
    assert {f.name for f in fields} <= set(TrainConfig.__dataclass_fields__)
    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    config_flags = [a.dest for a in train._actions if a.dest in TrainConfig.__dataclass_fields__]
    assert config_flags == [f.name for f in fields]
    assert {"momentum", "eval_size", "checkpoint_minutes", "description", "extra"}.isdisjoint(config_flags)
    by_dest = {a.dest: a for a in train._actions}
    for f in fields:
        assert by_dest[f.name].option_strings == ["--" + f.name.replace("_", "-")]
        assert "{" not in by_dest[f.name].help  # every placeholder filled
        assert f.metadata["help"].split(" {")[0] in by_dest[f.name].help
    ns = build_parser().parse_args(["train", "--k-range", "5,20", "--random-start", "true", "--eps", "linf=0.1"])
    assert ns.k_range == (5, 20) and ns.random_start is True and ns.eps == {"linf": 0.1}
