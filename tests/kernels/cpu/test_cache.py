"""The kernel cache keeps itself fresh (bnkit.kernels.cpu.cache).

A copy of the bnkit package in a temporary directory runs a kernel of ``cpu/act.py`` in a subprocess;
then a helper of ``cpu/half.py`` that the kernel compiles in (through ``cpu/passes.py``) is edited, and a new
subprocess must run the new code, wherever numba keeps its cache: the package's ``__pycache__``,
``NUMBA_CACHE_DIR``, or the per-user directory numba falls back to when the package is not writable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bnkit
from bnkit.kernels.cpu import cache

# row_reduce_ms sums g = dz * leaky_relu'(y) per row in blocks of RBLOCK values, each block's sum starting
# from to_acc(z, 0.0); the edit below makes that start 1000 for float64 data, so each row's sum grows by
# 1000 per block: 600 values are 3 blocks of at most 256.
SCRIPT = """
import json, sys
import numpy as np
{prelude}
from bnkit.kernels.cpu import act as cpu_act
from bnkit.kernels.cpu import cache
R, C, S = 2, 1, 600
x = np.linspace(-1.0, 1.0, R * S)
dz = np.ones(R * S)
g, gx = np.zeros(R), np.zeros(R)
zero = np.zeros(1)
cpu_act.row_reduce_ms(np.float64(0.0), dz.ctypes.data, x.ctypes.data, R, C, S, zero.ctypes.data, 2, 0.5, -1.0,
                      g.ctypes.data, gx.ctypes.data)
print(json.dumps({{"file": cpu_act.__file__, "g": g.tolist(), "dir": str(cache.cache_dir())}}))
"""
# numba takes the per-user directory when the package's __pycache__ cannot be written; tests run as root
# here (chmod would not stop root), so the in-tree locator is refused as an unwritable directory makes it.
NO_IN_TREE = """
from numba.core import caching
caching.InTreeCacheLocator.from_function = classmethod(lambda cls, py_func, py_file: None)
"""
OLD = "return lambda a, v: np.float64(v)\n"
NEW = "return lambda a, v: np.float64(v) + 1000.0\n"


def _run(pkg: Path, env: dict[str, str], prelude: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(prelude=prelude)], capture_output=True, text=True,
                          env=env, cwd=pkg, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve() == (pkg / "bnkit" / "kernels" / "cpu" / "act.py").resolve()
    return out


@pytest.mark.parametrize("where", ["in-tree", "NUMBA_CACHE_DIR", "per-user"])
def test_edited_helper_reaches_cached_kernel(tmp_path: Path, where: str) -> None:
    pkg = tmp_path / "pkg"
    shutil.copytree(Path(bnkit.__file__).parent, pkg / "bnkit", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "PYTHON", "XDG_"))}
    env["PYTHONPATH"] = str(pkg)
    env["XDG_CACHE_HOME"] = str(tmp_path / "user-cache")
    prelude = ""
    if where == "NUMBA_CACHE_DIR":
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
        root = tmp_path / "numba-cache"
    elif where == "per-user":
        prelude = NO_IN_TREE
        root = tmp_path / "user-cache"
    else:
        root = pkg / "bnkit" / "kernels" / "cpu" / "__pycache__"

    first = _run(pkg, env, prelude)
    assert first["g"] == [300.0, 600.0]
    where_cached = Path(first["dir"])
    assert where_cached.is_relative_to(root)
    cached = sorted(p.name for p in where_cached.glob("act.row_reduce_ms-*.nb[ic]"))
    assert len(cached) == 2  # numba put the kernel where the check looks
    assert json.loads((where_cached / cache.STAMP_NAME).read_text())["act"]

    if where == "in-tree":  # nothing changed: the cached kernel stays
        stamp = {p.name: p.stat().st_mtime_ns for p in where_cached.glob("act.*.nbc")}
        assert _run(pkg, env, prelude)["g"] == [300.0, 600.0]
        assert {p.name: p.stat().st_mtime_ns for p in where_cached.glob("act.*.nbc")} == stamp

    half = pkg / "bnkit" / "kernels" / "cpu" / "half.py"
    text = half.read_text()
    assert text.count(OLD) == 1
    half.write_text(text.replace(OLD, NEW))
    assert _run(pkg, env, prelude)["g"] == [3300.0, 3600.0]


def test_hash_covers_imported_kernel_modules(tmp_path: Path) -> None:
    kernels = tmp_path / "kernels"
    shutil.copytree(cache.KERNEL_DIR, kernels, ignore=shutil.ignore_patterns("__pycache__"))
    before = cache.source_hashes(kernels)
    assert before == cache.source_hashes(cache.KERNEL_DIR)

    half = kernels / "half.py"
    half.write_text(half.read_text() + "\n# edited\n")
    after = cache.source_hashes(kernels)
    changed = {stem for stem in before if before[stem] != after[stem]}
    # every module that imports half directly or through passes; nothing else
    assert {"half", "passes", "act", "drivers", "backend"} <= changed
    assert not changed & {"plan", "cache", "__init__"}

    act = kernels / "act.py"
    act.write_text(act.read_text() + "\n# edited\n")
    again = cache.source_hashes(kernels)
    assert {stem for stem in after if after[stem] != again[stem]} == {"act"}


def test_cache_dir_is_numbas() -> None:
    from bnkit.kernels.cpu import act as cpu_act

    assert cache.cache_dir() == Path(cpu_act.row_reduce_ms._cache.cache_path)
