"""Running the ``bnkit`` command in-process, for the tests of its sub-commands."""

from __future__ import annotations

import contextlib
import io

from bnkit.cli import main


def call(*args: str) -> tuple[int, str, str]:
    """Run the console script's entry point in-process; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def one_line(text: str) -> bool:
    """Whether ``text`` is a single line and no traceback (the command line's error contract)."""
    return len(text.strip().splitlines()) == 1 and "Traceback" not in text
