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


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    block = ci.split("# README test command (start)\n")[1].split("# README test command (end)")[0].strip()
    assert block == _readme_commands()[1]


def test_no_install_asks_for_an_unpinned_torch():
    for text in (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text():
        for m in re.finditer(r"pip install[^\n&]*", text):
            assert not re.search(r"\btorch(?![=\w])", m.group(0)), m.group(0)
