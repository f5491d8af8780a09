"""A/B of two bnkit source trees on the CPU benchmark's cases, interleaved in one run.

    python benchmarks/ab_cpu.py OLD_TREE NEW_TREE [--rounds 15] [--threads 2] [--quick] [--out FILE]

Each tree runs in its own worker process (``PYTHONPATH=TREE/src``) that builds
:data:`bnkit.bench.cpu.CASES` once. The parent asks the workers in turn, round after round, to time
one (case, mode) with bnkit and with torch's batch norm, so both trees see the same machine state
(each timing starts 10 ms after the request, once the other worker's idle threads have stopped spinning,
and every round makes new tensors: where a tensor lands in memory moves a large case's time by up to
~15% for the life of a process, which an A/A run of one tree against itself shows);
a row's figure is the median over rounds. ``new/old`` is the new tree's speed relative to the old
(old ms / new ms, > 1 is faster); ``vs torch`` is torch ms / bnkit ms in the new tree's worker.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
import bnkit
from bnkit.bench.cpu import CASES, QUICK_CASES, MODES, _bn_fn
cases = QUICK_CASES if sys.argv[2] == "quick" else CASES
fns = {}
print(json.dumps([c.label for c in cases]), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request == "reset":  # new tensors: their placement in memory changes from round to round
        fns.clear()
        print(json.dumps(0), flush=True)
        continue
    i, mode, impl, calls = request
    key = (i, mode, impl)
    if key not in fns:
        fns[key] = _bn_fn(cases[i], mode, impl)
        for _ in range(3):
            fns[key]()
    fn = fns[key]
    with bnkit.use_backend("cpu"):
        if calls == 0:  # calibrate: calls for about 20 ms
            t = time.perf_counter(); fn(); t = time.perf_counter() - t
            out = max(1, int(0.02 / max(t, 1e-7)))
        else:
            time.sleep(0.01)  # the other worker's idle OpenMP threads stop spinning first
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            out = (time.perf_counter() - t) / calls
    print(json.dumps(out), flush=True)
"""


class Worker:
    def __init__(self, tree: Path, threads: int, quick: bool) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(threads), "quick" if quick else "full"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self.labels = json.loads(self.proc.stdout.readline())

    def ask(self, *request: object) -> float:
        return self._send(request)

    def reset(self) -> None:
        self._send("reset")

    def _send(self, request: object) -> float:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the table (text) and FILE.json")
    args = p.parse_args(argv)
    workers = {"old": Worker(args.old, args.threads, args.quick), "new": Worker(args.new, args.threads, args.quick)}
    labels = workers["new"].labels
    if workers["old"].labels != labels:
        raise SystemExit("the two trees benchmark different cases")
    modes = ("train_fwd", "eval_fwd", "train_fwd_bwd")
    rows = [(i, m) for i in range(len(labels)) for m in modes]
    calls = {r: workers["new"].ask(*r, "bnkit", 0) for r in rows}
    times: dict = {(w, r, impl): [] for w in workers for r in rows for impl in ("bnkit", "torch")}
    rng = random.Random(0)
    for k in range(args.rounds):
        for w in workers.values():
            w.reset()
        for r in rows:
            order = [(w, impl) for w in workers for impl in ("bnkit", "torch")]
            rng.shuffle(order)
            for w, impl in order:
                times[(w, r, impl)].append(workers[w].ask(*r, impl, calls[r]))
        print(f"round {k + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for w in workers.values():
        w.close()
    med = {key: statistics.median(v) for key, v in times.items()}
    lines = [f"{'case':32} {'mode':14} {'old ms':>9} {'new ms':>9} {'new/old':>8} {'vs torch':>8}"]
    result = []
    for i, m in rows:
        old, new = med[("old", (i, m), "bnkit")], med[("new", (i, m), "bnkit")]
        vs_torch = med[("new", (i, m), "torch")] / new
        result.append({"case": labels[i], "mode": m, "old_ms": old * 1e3, "new_ms": new * 1e3,
                       "new_over_old": old / new, "new_vs_torch": vs_torch})  # fmt: skip
        lines.append(f"{labels[i]:32} {m:14} {old * 1e3:9.4f} {new * 1e3:9.4f} {old / new:8.3f} {vs_torch:8.3f}")
    ratios = [r["new_over_old"] for r in result]
    lines.append(f"new/old: median {statistics.median(ratios):.3f}, min {min(ratios):.3f} "
                 f"({args.rounds} rounds, {args.threads} threads)")  # fmt: skip
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
