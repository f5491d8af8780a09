"""Every fenced ```python block of README.md and docs/*.md runs.

The blocks of one file run in order in one namespace, so a later block may use the names an
earlier one made. A block that is not meant to run (shell commands, program output) uses
another fence language (```bash, ```text). The blocks run in a temporary directory, so the
files they write (plots, checkpoints) land there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A fence opens at the start of a line with ``` and a language, and closes at the next line of
# ``` alone (the fences may be indented, as inside a list item).
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ``python`` blocks of a Markdown text: (line of the opening fence, dedented code)."""
    blocks = []
    for m in FENCE.finditer(text):
        if m.group("lang").strip() != "python":
            continue
        indent = len(m.group("indent"))
        body = "".join(line[indent:] for line in m.group("body").splitlines(keepends=True))
        blocks.append((text.count("\n", 0, m.start()) + 1, body))
    return blocks


def test_fences_are_closed_and_labelled():
    # Every opening fence names its language, so an unlabelled block cannot escape the test.
    for path in doc_files():
        fences = [line for line in path.read_text().splitlines() if line.lstrip().startswith("```")]
        assert len(fences) % 2 == 0, f"{path.name}: an unclosed code fence"
        openings = fences[0::2]
        unlabelled = [line for line in openings if not line.strip()[3:].strip()]
        assert not unlabelled, f"{path.name}: a code fence without a language: use ```python, ```bash or ```text"


def files_with_python() -> list[Path]:
    return [p for p in doc_files() if python_blocks(p.read_text())]


@pytest.mark.parametrize("path", files_with_python(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(path: Path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for line, code in blocks:
        # Line numbers in a traceback point into the Markdown file.
        source = "\n" * line + code
        exec(compile(source, f"{path.relative_to(ROOT)}", "exec"), namespace)


LINK = re.compile(r"\]\((?!https?://|#|mailto:)(?P<target>[^)#\s]+)(?:#[^)\s]*)?\)")


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path):
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", path.read_text()))   # links live outside code
    for m in LINK.finditer(prose):
        target = (path.parent / m.group("target")).resolve()
        assert target.exists(), f"{path.name}: broken link to {m.group('target')}"
