"""pyens.atomic_files: the one atomic-write implementation every writer of pyens uses."""
import pytest

from pyens.atomic_files import atomic_write, atomic_write_text, remove_stray_temporaries


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old")

    def write(f):
        f.write(b"half of the new")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, write)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_the_new_bytes_appear_only_at_the_rename(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old")
    seen = []
    atomic_write(path, lambda f: f.write(b"new"), before_rename=lambda: seen.append(path.read_text()))
    assert seen == ["old"] and path.read_text() == "new"


def test_two_writers_of_one_path_use_different_temporaries(tmp_path):
    path = tmp_path / "cache.json"
    names = []

    def outer(f):
        names.append(f.name)
        atomic_write_text("inner", path)  # a second writer while the first is mid-write

    atomic_write(path, lambda f: (outer(f), f.write(b"outer")))
    assert path.read_text() == "outer"  # the last rename wins, whole
    assert len(names) == 1 and not (tmp_path / ".cache.json.tmp").exists()


def test_stray_temporaries_are_removed_and_others_kept(tmp_path):
    path = tmp_path / "checkpoint.pt"
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_text("x")
    (tmp_path / ".other.pt.abc.tmp").write_text("y")
    remove_stray_temporaries(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc.tmp"]


def test_run_dir_names_every_file_of_a_run(tmp_path):
    from pyens.training.run_dir import RunDir

    run = RunDir(str(tmp_path))
    assert [p.name for p in (run.config, run.checkpoint, run.metrics, run.eval_json, run.eval_md)] == [
        "config.toml", "checkpoint.pt", "metrics.jsonl", "eval.json", "eval.md"]
    assert run.config.parent == tmp_path
    assert run.missing() == ["config.toml", "checkpoint.pt"]
    run.config.write_text("")
    assert run.missing() == ["checkpoint.pt"]


def test_run_dir_claim_is_exclusive_and_release_gives_it_back(tmp_path):
    from pyens.training.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    assert run.claim("method = 'mat'\n") is True
    assert run.config.read_text() == "method = 'mat'\n"
    assert RunDir(tmp_path / "run").claim("other") is False  # a second run never shares it
    assert run.config.read_text() == "method = 'mat'\n"
    run.metrics.write_text("")
    run.release(remove_dir=True)
    assert not run.path.exists()  # config and empty metrics gone, then the empty directory
    assert run.claim("again") is True
    run.metrics.write_text('{"epoch": 1}\n')  # a record: not the failed start's empty file
    run.release(remove_dir=True)
    assert sorted(p.name for p in run.path.iterdir()) == ["metrics.jsonl"]
    run.checkpoint.write_bytes(b"x")  # a run written before claims existed is never claimed
    assert run.claim("x") is False
