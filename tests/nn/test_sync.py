"""bnkit.nn.SyncBatchNorm against a single-process torch.nn.BatchNorm over the concatenated batch.

Spawning processes is slow, so each spawned run (2 or 3 processes, gloo on 127.0.0.1)
performs many checks and writes one verdict per check; the tests below read the verdicts.
Every run is bounded by a join timeout; the collective timeout of the failure run is 5 s.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bn_tolerances import CHAN, MERGED, TRAINING, assert_close, tolerance
from torch import nn

import bnkit
from bnkit.distributed import SyncBatchNormError, merge_stats_many
from bnkit.reference import merge_stats

ROOT = Path(__file__).resolve().parents[2]


_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object", "broadcast",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
    "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)


# --- the launcher -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, outdir: str, scenario: str, timeout_s: float) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    backend = "nccl" if scenario == "nccl" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    verdicts: dict[str, str | None] = {"startup cpu seconds": round(time.process_time(), 3)}
    SCENARIOS[scenario](rank, world, verdicts)
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(verdicts))
    if scenario == "failure":
        os._exit(0)  # the group is broken on purpose: skip the teardown handshake
    dist.destroy_process_group()


def _warm_backend() -> None:
    """Run the kernels once here so that a disk-cached backend (numba) is compiled before the spawn.

    Spawned processes start cold; with a warm on-disk cache they load kernels instead of
    compiling them once per process.
    """
    for dtype in (torch.float64, torch.float32):
        for shape, fmt in (((2, 3, 2, 2), torch.channels_last), ((2, 3, 2, 2, 2), torch.channels_last_3d),
                           ((3, 2), torch.contiguous_format), ((2, 3, 4), torch.contiguous_format),
                           ((2, 3, 2, 2), torch.contiguous_format)):
            layer = bnkit.nn.SyncBatchNorm(shape[1], dtype=dtype)
            x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
            layer(x).sum().backward()
            layer.eval()
            layer(x).sum().backward()


def _spawn(scenario: str, world: int, outdir: Path, collective_timeout_s: float = 30.0,
           join_timeout_s: float = 240.0) -> list[dict[str, str | None]]:
    _warm_backend()
    ctx = mp.start_processes(_entry, args=(world, _free_port(), str(outdir), scenario, collective_timeout_s),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + join_timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"scenario {scenario!r} on {world} processes did not finish in {join_timeout_s} s")
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(world) if
            (outdir / f"rank{r}.json").exists()]


def _check(verdicts: dict[str, str | None], name: str, fn: Callable[[], None]) -> None:
    start = time.process_time()
    try:
        fn()
        verdicts[name] = None
    except Exception:
        verdicts[name] = traceback.format_exc()
    verdicts[f"{name} cpu seconds"] = round(time.process_time() - start, 3)


@contextmanager
def _count_collectives() -> Iterator[list[str]]:
    """Record the name of every torch.distributed collective called inside the block."""
    calls: list[str] = []
    saved = {}
    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapper)
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


# --- the module against the oracle --------------------------------------------------------

_TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype,
           errors: list[str] | None = None, atol: float | None = None) -> None:
    """assert_close with the dtype's tolerances; with ``errors``, record instead of raising.

    Recording keeps every process on the same sequence of collectives when one check fails.
    """
    tol = tolerance(dtype, MERGED)
    try:
        torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] if atol is None else atol,
                                   msg=lambda m: f"{what}: {m}")
    except AssertionError as exc:
        if errors is None:
            raise
        errors.append(str(exc))


def _exactness_case(rank: int, world: int, case: dict, group=None, members: list[int] | None = None) -> None:
    """SyncBatchNorm on this rank's slice == torch BN on the batch of every member, over `steps` steps."""
    members = members if members is not None else list(range(world))
    dtype = case.get("dtype", torch.float64)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    gathers = "all_gather" if device is None else (
        "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor")
    c, spatial, sizes = case["C"], case["spatial"], case["sizes"]
    fmt = case.get("memory_format", torch.contiguous_format)
    kw = {k: case[k] for k in ("momentum", "affine", "track_running_stats") if k in case}
    errors: list[str] = []
    atol = case.get("atol")
    me = members.index(rank)
    lo, hi = sum(sizes[:me]), sum(sizes[: me + 1])
    gen = torch.Generator().manual_seed(7)
    cd = case.get("channel_dim", 1)

    def channels_at(t: torch.Tensor, dim: int) -> torch.Tensor:  # (N, C, *) <-> channels in dim `cd`
        return t if cd == 1 else (t.movedim(1, cd).contiguous() if dim == cd else t.movedim(cd, 1))

    sync = bnkit.nn.SyncBatchNorm(c, process_group=group, dtype=dtype, device=device, channel_dim=cd, **kw)
    oracle = _TORCH_BN[2 + len(spatial)](c, dtype=dtype, device=device, **kw)
    if sync.affine:
        with torch.no_grad():
            sync.weight.copy_(torch.rand(c, generator=gen, dtype=dtype) + 0.5)
            sync.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))  # copy_ moves them to the device
            oracle.weight.copy_(sync.weight)
            oracle.bias.copy_(sync.bias)
    for step in range(case.get("steps", 2)):
        full = torch.randn(sum(sizes), c, *spatial, generator=gen, dtype=dtype) * case.get("scale", 2.0)
        full = (full + case.get("shift", 1.0)).to(device)
        gy = torch.randn(full.shape, generator=gen, dtype=dtype).to(device)
        xo = full.clone().requires_grad_(True)
        yo = oracle(xo)
        yo.backward(gy)
        x = channels_at(full[lo:hi].contiguous(memory_format=fmt), cd).requires_grad_(True)
        with _count_collectives() as calls:
            y = sync(x)
            fwd = list(calls)
            y.backward(channels_at(gy[lo:hi].contiguous(memory_format=fmt), cd))
        if fwd != [gathers] or calls != [gathers, "all_reduce"]:
            errors.append(f"step {step}: expected one all_gather forward and one all_reduce backward, "
                          f"got {fwd} then {calls[len(fwd):]}")
        if x.numel() and not y.is_contiguous(memory_format=fmt):
            errors.append(f"output lost the memory format {fmt}")
        _close(channels_at(y, 1), yo[lo:hi], f"step {step} output", dtype, errors, atol)
        _close(channels_at(x.grad, 1), xo.grad[lo:hi], f"step {step} input grad", dtype, errors, atol)
        if sync.affine:
            grads = torch.cat([sync.weight.grad, sync.bias.grad])
            dist.all_reduce(grads, group=group)  # DDP's job: sum the local parameter gradients
            expected = torch.cat([oracle.weight.grad, oracle.bias.grad])
            _close(grads, expected, f"step {step} param grads", dtype, errors, atol)
            sync.weight.grad = sync.bias.grad = oracle.weight.grad = oracle.bias.grad = None
        if sync.track_running_stats:
            _close(sync.running_mean, oracle.running_mean, f"step {step} running_mean", dtype, errors, atol)
            _close(sync.running_var, oracle.running_var, f"step {step} running_var", dtype, errors, atol)
            if int(sync.num_batches_tracked) != int(oracle.num_batches_tracked):
                errors.append(f"num_batches_tracked {int(sync.num_batches_tracked)} "
                              f"!= {int(oracle.num_batches_tracked)}")
            stats = torch.cat([sync.running_mean, sync.running_var, sync.num_batches_tracked.to(dtype).view(1)])
            every = [torch.empty_like(stats) for _ in members]
            dist.all_gather(every, stats.to(device), group=group)
            if not all(torch.equal(s, every[0]) for s in every):
                errors.append("running statistics differ between processes")
    # eval: running statistics (or local batch statistics without them), and no message at all
    sync.eval()
    oracle.eval()
    full = torch.randn(sum(sizes), c, *spatial, generator=gen, dtype=dtype).to(device)
    x = full[lo:hi].contiguous(memory_format=fmt)
    with _count_collectives() as calls:
        y = channels_at(sync(channels_at(x, cd)), 1)
    if calls:
        errors.append(f"eval mode communicated: {calls}")
    if x.numel() // c > 1:
        expected = oracle(full)[lo:hi] if sync.track_running_stats else oracle(x)
        _close(y, expected, "eval output", dtype, errors, atol)
    if errors:
        raise AssertionError("\n".join(errors))


CASES_2 = {
    "2d-even": dict(C=3, spatial=(4, 5), sizes=(3, 3)),
    "2d-uneven": dict(C=3, spatial=(4, 5), sizes=(1, 4)),
    "2d-one-empty": dict(C=3, spatial=(2, 3), sizes=(0, 5)),
    "1d-NC-uneven": dict(C=4, spatial=(), sizes=(1, 3)),
    "1d-NCL-one-empty": dict(C=3, spatial=(6,), sizes=(4, 0)),
    "3d-uneven": dict(C=2, spatial=(3, 2, 2), sizes=(2, 1)),
    "2d-channels_last-uneven": dict(C=3, spatial=(3, 4), sizes=(2, 3), memory_format=torch.channels_last),
    "3d-channels_last-one-empty": dict(C=2, spatial=(2, 3, 2), sizes=(0, 3), memory_format=torch.channels_last_3d),
    "2d-momentum-None": dict(C=3, spatial=(2, 2), sizes=(2, 3), momentum=None, steps=3),
    "2d-no-affine": dict(C=3, spatial=(2, 2), sizes=(3, 1), affine=False),
    "2d-no-running-stats": dict(C=3, spatial=(2, 2), sizes=(3, 2), track_running_stats=False),
    # values 1e3 with a spread of 0.1: x - mean cancels 4 of float64's 16 digits, so outputs and gradients
    # of order one keep about 12: an absolute floor of 1e-10 instead of MERGED's
    "2d-large-mean": dict(C=3, spatial=(4, 4), sizes=(2, 5), shift=1e3, scale=1e-1, atol=1e-10),
    "2d-float32": dict(C=3, spatial=(4, 4), sizes=(2, 3), dtype=torch.float32),
    "1d-NLC-channel_dim=-1-one-empty": dict(C=3, spatial=(5,), sizes=(0, 3), channel_dim=-1),
}

CASES_3 = {
    "2d-uneven": dict(C=3, spatial=(3, 3), sizes=(1, 2, 4)),
    "2d-one-empty": dict(C=3, spatial=(3, 3), sizes=(3, 0, 2)),
    "1d-NC-two-empty": dict(C=4, spatial=(), sizes=(0, 0, 4)),
    "1d-NCL-uneven": dict(C=2, spatial=(5,), sizes=(2, 1, 1)),
    "3d-one-empty": dict(C=2, spatial=(2, 2, 3), sizes=(2, 3, 0)),
    "2d-channels_last-one-empty": dict(C=4, spatial=(3, 2), sizes=(2, 0, 3), memory_format=torch.channels_last),
}


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def _ddp_case(rank: int, world: int) -> None:
    """5 DDP steps with SyncBatchNorm on 2 processes == 5 single-process steps on the full batch."""
    dt = torch.float64
    torch.manual_seed(0)
    reference = _small_cnn().to(dt)
    model = bnkit.convert(copy.deepcopy(reference), sync=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    per = 4
    errors: list[str] = []
    for step in range(5):
        x = torch.randn(per * world, 3, 6, 6, generator=gen, dtype=dt)
        t = torch.randint(0, 3, (per * world,), generator=gen)
        loss_ref = nn.functional.cross_entropy(reference(x), t)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        sl = slice(rank * per, (rank + 1) * per)
        loss = nn.functional.cross_entropy(ddp(x[sl]), t[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        _close(mean_loss / world, loss_ref.detach(), f"step {step} loss", dt, errors)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        _close(p.detach(), q.detach(), f"parameter {name}", dt, errors)
    for (name, b), r in zip(model.named_buffers(), reference.buffers(), strict=True):
        if b.is_floating_point():
            _close(b, r, f"buffer {name}", dt, errors)
        elif not torch.equal(b, r):
            errors.append(f"buffer {name}: {b} != {r}")
    if errors:
        raise AssertionError("\n".join(errors))


def _fallback_case(rank: int, world: int) -> None:
    """A group of one process: local batch norm, no message."""
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    m = bnkit.nn.SyncBatchNorm(3, process_group=groups[rank]).double()
    oracle = nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with _count_collectives() as calls:
        y = m(x)
        y.sum().backward()
    if calls:
        raise AssertionError(f"a group of one process communicated: {calls}")
    _close(y, oracle(x), "output", torch.float64)
    _close(m.running_var, oracle.running_var, "running_var", torch.float64)


def _scenario_two(rank: int, world: int, verdicts: dict) -> None:
    for name, case in CASES_2.items():
        _check(verdicts, name, lambda case=case: _exactness_case(rank, world, case))
    _check(verdicts, "ddp", lambda: _ddp_case(rank, world))
    _check(verdicts, "fallback-group-of-one", lambda: _fallback_case(rank, world))


def _scenario_three(rank: int, world: int, verdicts: dict) -> None:
    for name, case in CASES_3.items():
        _check(verdicts, name, lambda case=case: _exactness_case(rank, world, case))
    # A subgroup: ranks 0 and 2 synchronize with each other; rank 1 is not a member (local BN).
    sub = dist.new_group([0, 2])
    case = dict(C=3, spatial=(2, 3), sizes=(2, 3))
    if rank != 1:
        _check(verdicts, "subgroup", lambda: _exactness_case(rank, world, case, group=sub, members=[0, 2]))
    else:
        _check(verdicts, "subgroup", lambda: _fallback_case_nonmember(sub))


def _fallback_case_nonmember(group) -> None:
    m = bnkit.nn.SyncBatchNorm(3, process_group=group).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with _count_collectives() as calls:
        y = m(x)
    if calls:
        raise AssertionError(f"a non-member of the group communicated: {calls}")
    _close(y, nn.BatchNorm2d(3).double()(x), "output", torch.float64)


def _scenario_failure(rank: int, world: int, verdicts: dict) -> None:
    """Rank 2 stalls, then leaves; rank 0's forward (group {0, 2}) and rank 1's backward (group {1, 2}) must raise.

    Rank 0 meets a peer that is alive but never arrives (the 5 s timeout fires); rank 1 meets
    a peer that has exited (the connection is closed).
    """
    # A subgroup has its own timeout (new_group's default is not the world group's).
    g_a = dist.new_group([0, 2], timeout=timedelta(seconds=5))
    g_b = dist.new_group([1, 2], timeout=timedelta(seconds=5))
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    if rank == 2:
        layer = bnkit.nn.SyncBatchNorm(3, process_group=g_b)
        layer(x)  # forward with rank 1, then stall past rank 0's timeout and leave without the backward
        dist.barrier(group=g_b)
        time.sleep(7.0)
        os._exit(0)
    group = g_a if rank == 0 else g_b
    model = bnkit.convert(nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 3, 1), bn=nn.BatchNorm2d(3))),
                          sync=True, process_group=group)
    start = time.monotonic()
    try:
        y = model(x)
        if rank == 1:
            dist.barrier(group=g_b)
            time.sleep(9.0)  # rank 2 is gone now
            start = time.monotonic()
            y.sum().backward()
        verdicts["error"] = None
    except SyncBatchNormError as exc:
        verdicts["error"] = str(exc)
    verdicts["seconds"] = time.monotonic() - start


def _scenario_nccl(rank: int, world: int, verdicts: dict) -> None:
    for name in ("2d-uneven", "2d-one-empty", "3d-channels_last-one-empty", "2d-float32"):
        _check(verdicts, name, lambda name=name: _exactness_case(rank, world, CASES_2[name]))


SCENARIOS = {"two": _scenario_two, "three": _scenario_three, "failure": _scenario_failure, "nccl": _scenario_nccl}


# --- tests reading the verdicts -----------------------------------------------------------


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[dict]:
    return _spawn("two", 2, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> list[dict]:
    return _spawn("three", 3, tmp_path_factory.mktemp("three"))


def _assert_all_ranks(results: list[dict], name: str, world: int) -> None:
    assert len(results) == world, f"only {len(results)} of {world} processes reported"
    failures = {r: v[name] for r, v in enumerate(results) if v.get(name, "missing") is not None}
    assert not failures, "\n".join(f"rank {r}:\n{msg}" for r, msg in failures.items())


@pytest.mark.timeout(280)
@pytest.mark.parametrize("name", [*CASES_2, "ddp", "fallback-group-of-one"])
def test_two_processes(two, name):
    _assert_all_ranks(two, name, 2)


@pytest.mark.timeout(280)
@pytest.mark.parametrize("name", [*CASES_3, "subgroup"])
def test_three_processes(three, name):
    _assert_all_ranks(three, name, 3)


@pytest.mark.gpu
@pytest.mark.timeout(280)
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(), reason="needs 2 GPUs and NCCL")
def test_nccl_two_gpus(tmp_path):
    results = _spawn("nccl", 2, tmp_path)
    for name in ("2d-uneven", "2d-one-empty", "3d-channels_last-one-empty", "2d-float32"):
        _assert_all_ranks(results, name, 2)


@pytest.mark.timeout(280)
def test_peer_that_leaves_raises_within_timeout(tmp_path):
    results = _spawn("failure", 3, tmp_path, collective_timeout_s=5.0, join_timeout_s=60.0)
    assert len(results) == 2, results  # rank 2 left on purpose
    forward, backward = results
    for res, what in ((forward, "forward all_gather"), (backward, "backward all_reduce")):
        assert res["error"] is not None, f"no error raised for the {what}"
        assert what in res["error"] and "SyncBatchNorm(3) 'bn'" in res["error"], res["error"]
        assert res["seconds"] < 5.0 + 10.0, f"{what} took {res['seconds']:.1f} s to fail"
    # It must wait out its 5 s timeout (not fail early) and not hang far past it; the upper bound leaves room
    # for a loaded 2-core CI machine (6.6 s was seen there), far below torch's default 30 min timeout.
    took = forward["seconds"]
    assert 4.0 < took < 5.0 + 10.0, f"rank 0 should fail at its 5 s timeout, took {took:.1f} s"


@pytest.mark.timeout(280)
def test_example_runs_under_torchrun(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "examples" / "ddp_train.py"), "--steps", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "running stats identical on every process: True" in proc.stdout, proc.stdout


# --- in-process checks (no spawning) ------------------------------------------------------


def test_merge_stats_many_equals_folded_chan_and_direct_stats():
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(n, 3, dtype=torch.float64, generator=gen) * 3 + 1e4 for n in (5, 0, 2, 7, 1)]
    counts = torch.tensor([float(p.shape[0]) for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3, dtype=torch.float64)
                       for p in parts])
    n, mean, m2 = merge_stats_many(counts, means, m2s)
    folded = (0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    for k in range(len(parts)):
        folded = merge_stats(*folded, int(counts[k]), means[k], m2s[k])
    whole = torch.cat(parts)
    assert int(n) == whole.shape[0] == folded[0]
    assert_close(mean, whole.mean(0), table=CHAN)
    assert_close(m2, ((whole - whole.mean(0)) ** 2).sum(0), table=CHAN)
    assert_close(mean, folded[1], table=CHAN)
    assert_close(m2, folded[2], table=CHAN)
    empty = merge_stats_many(torch.zeros(2, dtype=torch.float64), torch.ones(2, 3), torch.ones(2, 3) * 0)
    assert int(empty[0]) == 0 and torch.equal(empty[1], torch.zeros(3))


def test_module_has_torch_state_dict_and_repr():
    ours, theirs = bnkit.nn.SyncBatchNorm(5, momentum=None), nn.SyncBatchNorm(5, momentum=None)
    # A _BatchNorm, deliberately not a torch.nn.SyncBatchNorm: DDP rejects those on CPU.
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm) and not isinstance(ours, nn.SyncBatchNorm)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_it_is_local_batch_norm(momentum):
    assert not dist.is_initialized()
    ours = bnkit.nn.SyncBatchNorm(3, momentum=momentum).double()
    oracle = nn.BatchNorm3d(3, momentum=momentum).double()
    for _ in range(2):
        x = torch.randn(3, 3, 2, 3, 2, dtype=torch.float64) * 2 + 1
        assert_close(ours(x), oracle(x), table=TRAINING)
    assert_close(ours.running_var, oracle.running_var, table=TRAINING)
    assert int(ours.num_batches_tracked) == 2
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 3, 1, 1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(3, dtype=torch.float64))


def test_convert_sync_batchnorm_shares_parameters_and_buffers():
    model = nn.Sequential(OrderedDict(
        a=nn.BatchNorm1d(2), b=nn.Sequential(bnkit.nn.BatchNorm2d(3, channel_dim=-1)), c=nn.BatchNorm3d(4).eval(),
        d=nn.SyncBatchNorm(5), e=nn.Linear(2, 2),
    ))
    before = {k: v for k, v in model.state_dict().items()}
    out = bnkit.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert out is model
    for name in ("a", "b.0", "c", "d"):
        layer = out.get_submodule(name)
        assert type(layer) is bnkit.nn.SyncBatchNorm, name
        assert layer._bnkit_layer_name == name
    assert out.b[0].channel_dim == -1 and not out.c.training and out.a.training
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in before)
    single = bnkit.nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(3, affine=False))
    assert type(single) is bnkit.nn.SyncBatchNorm and single.weight is None


def test_convert_with_sync_flag_and_torch_twin():
    model = bnkit.convert(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), sync=True)
    assert type(model[1]) is bnkit.nn.SyncBatchNorm
    twin = bnkit.convert(nn.Sequential(nn.SyncBatchNorm(2)))
    assert type(twin[0]) is bnkit.nn.SyncBatchNorm
    assert type(bnkit.convert(twin, to="torch")[0]) is nn.SyncBatchNorm
    with pytest.raises(ValueError, match="sync=True"):
        bnkit.convert(model, to="torch", sync=True)
    with pytest.raises(ValueError, match="process_group"):
        bnkit.convert(model, process_group=object())
