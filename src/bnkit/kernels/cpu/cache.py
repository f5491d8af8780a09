"""Keeps numba's on-disk cache of the CPU kernels in step with their sources.

numba's cache checks only the file a function is defined in, while the kernels of
:mod:`bnkit.kernels.cpu.act` and :mod:`bnkit.kernels.cpu.drivers` compile helpers of
:mod:`bnkit.kernels.cpu.passes` into theirs, and :mod:`bnkit.kernels.cpu.passes` those of
:mod:`bnkit.kernels.cpu.half`: after an edit of a helper, the cached kernels of the other files would
keep the old code. :func:`ensure_fresh` (called by :mod:`bnkit.kernels.cpu.half`, which every kernel
module imports first, before any dispatcher exists) hashes each kernel module together with the
kernel modules it imports (found in its source, so no list here can go stale), compares the hashes with
a stamp stored beside numba's cache files, and removes the cache files of every module whose hash
changed.

The directory is the one numba itself picks for these files (its locators: ``NUMBA_CACHE_DIR``, the
package's ``__pycache__`` when writable, else the per-user cache directory), asked of numba's own
cache machinery so that every case agrees with numba.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
from pathlib import Path

__all__ = ["STAMP_NAME", "cache_dir", "ensure_fresh", "source_hashes"]

_log = logging.getLogger("bnkit")

KERNEL_DIR = Path(__file__).resolve().parent
_PACKAGE = __name__.rpartition(".")[0]  # "bnkit.kernels"
STAMP_NAME = "bnkit-kernels.stamp"

_checked: list[str] | None = None


def _locator_probe() -> None:
    """A function of this directory: numba's cache locators place its files where they place the kernels'."""


def cache_dir() -> Path | None:
    """The directory where numba keeps the cached kernels of this package (``None`` if caching is off)."""
    try:
        from numba.core.caching import FunctionCache

        return Path(FunctionCache(_locator_probe).cache_path)
    except RuntimeError:  # no locator: numba cannot cache these kernels anywhere
        return None


def _kernel_imports(tree: ast.Module) -> set[str]:
    """Stems of the modules of this package that a module imports at its top level."""
    stems: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.module == _PACKAGE:
                names = [a.name for a in node.names]
            elif node.module and node.module.startswith(_PACKAGE + "."):
                names = [node.module[len(_PACKAGE) + 1 :]]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name[len(_PACKAGE) + 1 :] for a in node.names if a.name.startswith(_PACKAGE + ".")]
        else:
            continue
        stems.update(n.split(".")[0] for n in names if n)
    stems.discard(__name__.rpartition(".")[2])  # this module holds no kernel code
    return stems


def source_hashes(directory: Path = KERNEL_DIR) -> dict[str, str]:
    """``{module stem: sha256}`` of each module of ``directory`` together with every module of the package
    it imports at its top level, directly or not (the code numba may compile into its kernels)."""
    sources = {p.stem: p.read_bytes() for p in sorted(directory.glob("*.py"))}
    deps = {}
    for stem, src in sources.items():
        try:
            deps[stem] = _kernel_imports(ast.parse(src)) & sources.keys()
        except SyntaxError:  # a broken file: its own hash still changes
            deps[stem] = set()
    hashes = {}
    for stem in sources:
        seen, todo = {stem}, [stem]
        while todo:
            for dep in deps[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        h = hashlib.sha256()
        for name in sorted(seen):
            h.update(name.encode() + b"\0" + sources[name] + b"\0")
        hashes[stem] = h.hexdigest()
    return hashes


def ensure_fresh() -> list[str]:
    """Remove the cached kernels whose sources (or those of a module they import) changed since they were
    cached; returns the names of the removed files. Runs once per process; later calls return ``[]``."""
    global _checked
    if _checked is not None:
        return []
    _checked = []
    try:
        where = cache_dir()
        if where is None:
            return []
        hashes = source_hashes()
        stamp = where / STAMP_NAME
        try:
            old = json.loads(stamp.read_text())
        except (OSError, ValueError):
            old = {}
        stale = [stem for stem, h in hashes.items() if old.get(stem) != h]
        if not stale:
            return []
        for stem in stale:
            for f in sorted(where.glob(f"{stem}.*.nb[ic]")):
                try:
                    f.unlink()
                    _checked.append(f.name)
                except FileNotFoundError:  # another process removed it first
                    pass
        tmp = stamp.with_name(f"{STAMP_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(hashes, indent=0, sort_keys=True))
        os.replace(tmp, stamp)
    except OSError as exc:  # a cache directory that cannot be read or written: numba will say so itself
        _log.debug("bnkit: kernel cache check skipped (%s)", exc)
        return _checked
    if _checked:
        _log.info("bnkit: kernel sources changed; removed %d stale numba cache files in %s", len(_checked), where)
    return _checked
