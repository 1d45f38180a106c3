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
