"""The README's two commands are the product's front door: keep them true."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_the_two_commands():
    main, tests = _readme_commands()[:2]
    assert "pip install torch==2.13.0" in main and "--no-build-isolation" in main and "pyens " in main
    assert "pip install torch==2.13.0" in tests and "pytest" in tests


def _ci_block(name: str) -> str:
    ci = (ROOT / ".ci" / "run").read_text()
    return ci.split(f"# README {name} command (start)\n")[1].split(f"# README {name} command (end)")[0].strip()


def test_ci_runs_the_readme_commands_in_a_fresh_venv():
    assert _ci_block("main") == _readme_commands()[0]
    assert _ci_block("test") == _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("-m venv") < ci.index("# README main command (start)")


def test_no_install_asks_for_an_unpinned_torch():
    for text in (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text():
        for m in re.finditer(r"pip install[^\n&]*", text):
            assert not re.search(r"\btorch(?![=\w])", m.group(0)), m.group(0)


def _python_block(after_heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {after_heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_evaluate_your_own_model_example_runs():
    """The README's "Evaluate your own model" block, run as written on a tiny model and data."""
    import torch

    code = _python_block("Evaluate your own model")
    assert "pyens.load_run(" in code
    code = "\n".join(line for line in code.splitlines() if "load_run(" not in line)  # no run directory here
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(6, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    scope = {"MyNet": lambda: net, "my_images": x, "my_labels": y}
    torch.set_num_threads(1)
    exec(compile(code, "README.md", "exec"), scope)
    assert "All attacks" in scope["report"].table() and "PGD linf 4/255" in scope["report"].table()


def test_the_quickstart_trains_what_pyens_train_trains():
    code = _python_block("Quickstart")
    assert 'pyens.train(config="quick-mnist"' in code  # the shipped config, the CLI's default
    from pyens.cli import DEFAULT_CONFIG

    assert DEFAULT_CONFIG == "quick-mnist"
