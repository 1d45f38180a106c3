"""The docs speak to users: no paths they do not have, no wording from the project's own work."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()
# .ci/run runs beside the project's own checkout of the shared material; it is not shipped to users.
NOT_SHIPPED = {THIS, ".ci/run"}


def _shipped_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore (what the next commit ships)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the shipped file list comes from git")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return sorted({p for p in out.split("\0") if p and p not in NOT_SHIPPED and (ROOT / p).is_file()})


def _offenders(paths, pattern: re.Pattern) -> list[str]:
    hits = []
    for rel in paths:
        data = (ROOT / rel).read_bytes()
        if b"\0" in data[:8192]:  # binary (images, the compiled extension)
            continue
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{rel}:{n}: {line.strip()[:160]}")
    return hits


def _fail_listing(what: str, hits: list[str]) -> None:
    if hits:
        pytest.fail(f"{len(hits)} line(s) {what}:\n  " + "\n  ".join(hits), pytrace=False)


def test_no_shipped_file_names_the_shared_directory():
    # Users have no ../shared (the project's design reference and papers): link docs/ops.md instead.
    _fail_listing("name ../shared or shared/DESIGN",
                  _offenders(_shipped_files(), re.compile(r"\.\./shared|shared/DESIGN")))


def test_no_shipped_file_names_the_design_reference():
    # Same for the bare file name: the semantics it held are in docs/ops.md.
    _fail_listing("name DESIGN.md (users do not have it; link docs/ops.md)",
                  _offenders(_shipped_files(), re.compile(r"\bDESIGN\.md\b")))


_INTERNAL = re.compile(r"\blent\b|the issue['’]s bar|issue['’]s targets?", re.I)


def _docs() -> list[str]:
    return ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))


def test_docs_use_no_internal_wording():
    # "lent" (a GPU is "available"), "the bar" / "the target": the project's own
    # work, not something a user knows about.
    _fail_listing("use the project's internal wording", _offenders(_docs(), _INTERNAL))


def test_the_checks_catch_what_they_are_for():
    assert re.compile(r"\.\./shared|shared/DESIGN").search("see `../shared/papers/x.md`")
    assert re.compile(r"\.\./shared|shared/DESIGN").search("see shared/DESIGN.md")
    for text in ("No GPU was lent to this issue", "the issue's bar", "the Issue’s target", "the issue's targets"):
        assert _INTERNAL.search(text), text
    for text in ("when a GPU is available", "excellent", "relentless", "the issue tracker"):
        assert not _INTERNAL.search(text), text


def _bash_commands(text: str) -> list[str]:
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_install_doc_gives_the_two_commands_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()

    def ci_block(name: str) -> str:
        return ci.split(f"# README {name} command (start)\n")[1].split(f"# README {name} command (end)")[0].strip()

    assert _bash_commands((ROOT / "docs" / "install.md").read_text())[:2] == [ci_block("main"), ci_block("test")]


def test_install_doc_never_asks_for_an_unpinned_torch():
    text = (ROOT / "docs" / "install.md").read_text()
    installs = re.findall(r"pip install[^\n&]*", text)
    assert any("torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in m for m in installs)
    for m in installs:
        assert not re.search(r"\btorch(?![=\w])", m), m
