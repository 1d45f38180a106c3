"""The benchmark tables (bench/): Table 6 counts equal the formulas; the JSON, compare and README
plumbing. Tiny K, M and B; never a timing in an assertion."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bench import _env, compare, cost_table, readme, train_time

TINY = ["--batch-size", "4", "--repeats", "1", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches: one thread is faster than two fighting for a busy machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mnist():
    data, batches = cost_table.mnist_batches(4, 1, torch.device("cpu"))
    return data, batches[0]


@pytest.mark.parametrize(("k", "m"), [(2, 3), (1, 2)])
@pytest.mark.parametrize("method", cost_table.METHODS)
def test_measured_counts_equal_table_6(method, k, m, mnist):
    """One real training batch (loss, backward, Adam step) counted with hooks = the paper's formula."""
    data, (x, y) = mnist
    b = cost_table.MethodBench.build(method, data, torch.device("cpu"), steps=k, members=m, backbone="small_cnn",
                                     batch_size=4)
    assert b.cfg.members == (1 if method in ("standard", "at") else m)
    assert b.count(x, y) == cost_table.get_method(cost_table.method_of(method)).passes(k, m)


def test_the_authors_variant_row_runs_their_adversary():
    cfg = cost_table.config("mat_msd_batch", steps=1, members=3, backbone="small_cnn", batch_size=4, device="cpu")
    assert (cfg.method, cfg.msd_select, cfg.random_start, cfg.k_range) == ("mat_msd", "batch", True, (5, 20))


def test_msd_score_bench_runs(tmp_path, capsys):
    from bench import msd_score

    path = tmp_path / "score.json"
    assert msd_score.main(["--batch-size", "3", "--steps", "1", "--rounds", "1", "--threads", "1",
                           "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert len(res["stacked_ms"]) == len(res["per_norm_ms"]) == 1
    assert "stacked / per_norm" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        msd_score.main(["--rounds", "0"])


@pytest.fixture(scope="module")
def cost_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("cost") / "cpu-2026-01-01-cost-table.json"
    rc = cost_table.main(["--steps", "1", "--members", "2", "--methods", "standard,at,msd,mat,ensemble_at",
                          "--warmup", "0", "--json", str(path), *TINY])
    assert rc == 0  # every count equals its formula
    return path, json.loads(path.read_text())


def test_cost_table_json_rows(cost_rows):
    _, rows = cost_rows
    assert [r["method"] for r in rows] == ["standard", "at", "msd", "mat", "ensemble_at"]
    for r in rows:
        for key in ("forward", "backward", "formula_forward", "formula_backward", "ms_per_batch", "ratio_vs_at",
                    "device", "torch", "python", "pyens", "commit", "device_name"):
            assert key in r, key
        assert r["counts_match"] and len(r["ms_rounds"]) == 1 and r["device"] == "cpu"
    msd = cost_table.by_method(rows)["msd"]
    assert (msd["forward"], msd["backward"]) == ((1 + 2) * 1 + 1, 1 + 1)
    text = cost_table.markdown(rows)
    assert "(1 + M)K + 1 = 4" in text and "Every measured count equals the paper's formula." in text
    assert [t["target"] for t in cost_table.targets(rows)] == [t[0] for t in cost_table.TARGETS]


def test_train_time_rows(tmp_path):
    path = tmp_path / "cpu-2026-01-01-train-time.json"
    train_time.main(["--steps", "1", "--members", "2", "--methods", "standard,at", "--batches", "1",
                     "--json", str(path), *TINY])
    rows = json.loads(path.read_text())
    assert [r["method"] for r in rows] == ["standard", "at"]
    for r in rows:
        assert {"s_per_batch", "images_per_s", "extrapolated_epoch_s_mnist60k", "paper_mnist_s", "commit"} <= set(r)
    assert "*extrapolated*" in train_time.markdown(rows) and "10min23s" in train_time.markdown(rows)


def test_compare_two_runs(cost_rows, capsys):
    path, _ = cost_rows
    assert compare.main([str(path), str(path)]) == 0
    out = capsys.readouterr().out
    assert "| mat |" in out and "B / A" in out
    other = path.with_name("not-a-result.json")
    other.write_text("{}")
    with pytest.raises(ValueError, match="not a pytest-benchmark"):
        compare.load_run(other)


def test_readme_block_is_spliced_into_the_performance_section(cost_rows, tmp_path):
    path, _ = cost_rows
    kernels = {"datetime": "2026-01-01T00:00:00", "benchmarks": [
        {"name": n, "fullname": f"bench/bench_op.py::{n}", "group": "g", "stats": {"median": t},
         "extra_info": {"device": "cpu", "provider": p}} for n, p, t in (("a", "cpu", 1.0), ("b", "eager", 4.0), ("c", "cdist", 3.0), ("d", "reference", 0.5))]}
    (path.parent / "cpu-2026-01-01-op.json").write_text(json.dumps(kernels))
    doc = tmp_path / "README.md"
    doc.write_text("# x\n\n## Performance\n\nhand-written\n\n## Layout\n\nrest\n")
    assert readme.refresh(doc, path.parent, charts=False)
    text = doc.read_text()
    assert text.index("hand-written") < text.index(readme.START) < text.index(readme.END) < text.index("## Layout")
    assert "| op | cpu | cdist | 1 | 3.00× |" in text  # against the fastest peer, never the reference and "Table 6 reproduction" in text
    assert not readme.refresh(doc, path.parent, charts=False)  # idempotent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is visible")
def test_device_cuda_without_a_gpu_says_so():
    with pytest.raises(SystemExit, match="cuda.is_available"):
        _env.resolve_device("cuda")


def test_mahalanobis_interleaved_ratios(tmp_path, monkeypatch):
    """The interleaved side-by-side measurement: every provider timed each round, ratios per
    round, JSON and Markdown written (tiny shape; the figures themselves are not asserted)."""
    from bench import bench_mahalanobis as bm

    tiny = bm.Shape("tiny-6x2x3x5", 6, 2, 3, 5)
    monkeypatch.setitem(bm.SHAPES, tiny.name, tiny)
    out = tmp_path / "inter.json"
    assert bm.main(["--interleaved", "--shape", tiny.name, "--rounds", "3", "--block-s", "0.001",
                    "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rounds"] == 3 and set(res["median_s"]) >= {"cpu", "eager", "cdist"}
    assert set(res["ratios"]) == {"eager/cpu", "cdist/cpu"}
    for q in res["ratios"].values():  # measured times: their values are not asserted
        assert {"min", "q1", "median", "q3", "max"} <= set(q)
    assert "eager/cpu" in out.with_suffix(".md").read_text()
    res = bm.interleaved(tiny, "fwd", "cpu", rounds=2, block_s=0.001, providers=["cpu", "cdist"])
    assert set(res["ratios"]) == {"cdist/cpu"}


def test_gpu_session_script_parses_and_rejects_unknown_stages(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    bad = subprocess.run(["bash", str(script), "nope"], check=False, capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path)})
    assert bad.returncode == 2 and "usage: bash bench/gpu_session.sh test|bench|train" in bad.stderr
    assert not any(tmp_path.iterdir())  # nothing archived for a stage that does not exist


def test_backward_cost_times_every_pass_and_derives_b_over_f(tmp_path):
    from bench import backward_cost

    path = tmp_path / "b.json"
    assert backward_cost.main(["--batch-size", "4", "--rounds", "2", "--calls", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    passes = result["passes"]
    assert list(passes) == list(backward_cost.KINDS)
    for kind, row in passes.items():
        assert {"q1_ms", "median_ms", "q3_ms"} <= set(row), kind
    for kind in ("attack step", "training step"):
        graph = passes["forward+graph"]["median_ms"]  # b / f against the forward the backward follows
        expected = (passes[kind]["median_ms"] - graph) / graph
        assert passes[kind]["backward_over_forward_graph"] == pytest.approx(expected)
    assert result["commit"] is not None and result["batch_size"] == 4
    assert "| attack step |" in backward_cost.markdown(result)


def test_backward_cost_renders_a_saved_result_with_the_ratio_against_the_forward_with_graph(capsys):
    from bench import backward_cost

    path = Path(__file__).resolve().parents[1] / "bench" / "results" / "cpu-2026-11-22-backward-cost.json"
    assert backward_cost.main(["--render", str(path)]) == 0
    out = capsys.readouterr().out
    # (19.08 - 5.01) / 5.01 and (18.12 - 5.01) / 5.01, not the stored ratios over the no-graph forward
    assert "| attack step | 19.08 | 18.54–19.92 | 2.81 |" in out
    assert "| training step | 18.12 | 16.87–19.40 | 2.61 |" in out


@pytest.mark.parametrize("flag", ["--batch-size", "--rounds", "--calls"])
def test_backward_cost_rejects_counts_below_one(flag, capsys):
    from bench import backward_cost

    with pytest.raises(SystemExit):
        backward_cost.main([flag, "0"])
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_the_committed_benchmark_block_matches_the_committed_results():
    """docs/performance.md's generated block is what bench.readme makes of bench/results/ now
    (chart lines aside: drawing them is not a test's job)."""
    import re

    doc = _env.ROOT / "docs" / "performance.md"
    text = doc.read_text()
    block = text[text.index(readme.START):text.index(readme.END) + len(readme.END)]

    def norm(b: str) -> str:
        lines = [line for line in b.splitlines() if not line.startswith("![kernel speedups")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()

    assert norm(block) == norm(readme.section(_env.RESULTS, doc.parent, charts=False)), \
        "stale block: run `python -m bench.readme`"
