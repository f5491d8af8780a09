"""The 16-wide AVX-512 paths of 16-bit data in the cpu kernels (``bnkit.kernels.cpu.half``, ``SIMD_*``).

Where the CPU has the instructions, every normalize-type pass of bfloat16/float16 data rounds
16 values at a time with VCVTNEPS2BF16 / VCVTPS2PH and fixes NaNs and (bf16) float32 subnormals with
the integer codec; the claim is that each output has exactly the bits of the scalar codec. Here the
SIMD lanes (masked ones at the end of a row included) are compared bit for bit with the same formula as
scalar code (software codec) on every 16-bit pattern and on
coefficients that make float32 subnormals, NaNs and infinities. A subprocess compiles the kernels
for a generic CPU (no SIMD) and checks that path against torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from llvmlite import binding
from numba import njit, types
from numba.core import config
from numba.extending import intrinsic

from bnkit.kernels.cpu import half as S
from bnkit.kernels.cpu import passes as K

BITS = {torch.bfloat16: np.uint16, torch.float16: np.int16}
# The bit-for-bit claims are about the SIMD lanes; on a CPU without them the scalar loops run (checked
# against torch by the generic-CPU subprocess below and by kernels/cpu/test_backend.py).
SIMD_DTYPES = [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not S.SIMD_BF16, reason="no AVX-512 BF16 on this CPU")),
    pytest.param(torch.float16, marks=pytest.mark.skipif(not S.SIMD_F16, reason="no AVX-512 on this CPU")),
]


def test_flags_follow_the_host():
    have = binding.get_host_cpu_features()
    avx512 = all(have.get(f, False) for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl"))
    host = config.CPU_NAME is None and config.CPU_FEATURES is None
    assert S.SIMD_F16 == (host and avx512)
    assert S.SIMD_BF16 == (host and avx512 and have.get("avx512bf16", False))


@intrinsic
def _fma32(typingctx, a, b, c):
    # a*b + c rounded once in float32: one SIMD lane of half._affine16 as scalar code
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(a, b, c), codegen


@njit
def _affine(us, xs, os, has_u, a, m, k, sh):
    # the vector code, scalar or per-value coefficients (the kind comes from the types)
    S.affine(us, xs, os, xs.shape[0], has_u, a, m, k, sh)


@njit
def _span_scalar(us, xs, os, has_u, a, m, k, sh):
    # the SIMD lanes' formula as scalar code (software codec), value by value
    for i in range(xs.shape[0]):
        if has_u:
            S.store(os, i, _fma32(a, S.load(us, i), _fma32(k, S.load(xs, i) - m, sh)))
        else:
            S.store(os, i, _fma32(k, S.load(xs, i) - m, sh))


@njit
def _lanes_scalar(us, xs, os, has_u, a, m, k, sh):
    for i in range(xs.shape[0]):
        if has_u:
            S.store(os, i, _fma32(a[i], S.load(us, i), _fma32(k[i], S.load(xs, i) - m[i], sh[i])))
        else:
            S.store(os, i, _fma32(k[i], S.load(xs, i) - m[i], sh[i]))


def _assert_same_bits(got: np.ndarray, want: np.ndarray, dtype) -> None:
    # Bit for bit, except the sign of a float16 NaN: with two NaN operands (a NaN x and a NaN
    # coefficient) which one an FMA passes on depends on its operand order, and the vector and scalar
    # forms order them differently. bf16 NaNs are all 0x7FC0.
    if dtype == torch.float16:
        nan = (got.view(np.uint16) & 0x7FFF) > 0x7C00
        got, want = np.where(nan, got & 0x7FFF, got), np.where(nan, want & 0x7FFF, want)
    np.testing.assert_array_equal(got, want)


def _all_patterns(dtype) -> np.ndarray:
    # every 16-bit pattern (NaNs, infinities, subnormals included), in a length that leaves a tail
    bits = np.arange(-(2**15), 2**15, dtype=np.int32).astype(np.int16).view(BITS[dtype])
    return np.concatenate([bits, bits[:13]])


# (a, m, k, sh): plain, float32 subnormal results (the bf16 instruction flushes them), overflow to
# inf, and a NaN coefficient
COEFFS = [(0.75, 0.1, 1.5, 0.2), (1e-39, 0.0, 3e-39, 1e-40), (2.0, -1.0, 3e38, 0.0), (1.0, 0.0, float("nan"), 0.5)]


@pytest.mark.parametrize("dtype", SIMD_DTYPES, ids=str)
@pytest.mark.parametrize("has_u", [False, True])
@pytest.mark.parametrize("coeffs", COEFFS, ids=["plain", "subnormal", "overflow", "nan"])
def test_span_bits_are_the_scalar_codecs(dtype, has_u, coeffs):
    x = _all_patterns(dtype)
    u = np.roll(x, 7)
    a, m, k, sh = (np.float32(v) for v in coeffs)
    got, want = np.empty_like(x), np.empty_like(x)
    _affine(u, x, got, has_u, a, m, k, sh)
    _span_scalar(u, x, want, has_u, a, m, k, sh)
    _assert_same_bits(got, want, dtype)


@pytest.mark.parametrize("dtype", SIMD_DTYPES, ids=str)
@pytest.mark.parametrize("has_u", [False, True])
def test_lanes_bits_are_the_scalar_codecs(dtype, has_u):
    x = _all_patterns(dtype)
    u = np.roll(x, 5)
    rng = np.random.default_rng(0)
    # per-value coefficients that mix ordinary values with ones that give subnormal or NaN results
    a, m, k, sh = (rng.standard_normal(x.shape[0]).astype(np.float32) for _ in range(4))
    k[::17] = np.float32(2e-39)
    sh[::17] = np.float32(0.0)
    k[::101] = np.float32("nan")
    got, want = np.empty_like(x), np.empty_like(x)
    _affine(u, x, got, has_u, a, m, k, sh)
    _lanes_scalar(u, x, want, has_u, a, m, k, sh)
    _assert_same_bits(got, want, dtype)


@njit
def _sums(x, k):
    return S.block_sums(x, k)


@pytest.mark.parametrize("dtype", list(BITS), ids=str)
@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 1024])
def test_block_sums_match_float64(dtype, n):
    t = torch.randn(n, dtype=torch.float64) * 3 + 1000
    x = t.to(dtype)
    k = np.float32(x[0].item())
    s1, s2 = _sums(x.view(torch.int16).numpy().view(BITS[dtype]), k)
    d = x.double() - float(k)
    assert s1 == pytest.approx(d.sum().item(), rel=1e-6, abs=1e-3)
    assert s2 == pytest.approx((d * d).sum().item(), rel=1e-6, abs=1e-3)


@njit
def _dots(g, x, m):
    return S.dot_block(g, x, m)


@pytest.mark.parametrize("dtype", list(BITS), ids=str)
@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 1024])
def test_dot_block_matches_float64(dtype, n):
    g = (torch.randn(n, dtype=torch.float64) * 2).to(dtype)
    x = (torch.randn(n, dtype=torch.float64) * 3 + 1000).to(dtype)
    m = np.float32(x.double().mean().item())
    s0, s1 = _dots(*(t.view(torch.int16).numpy().view(BITS[dtype]) for t in (g, x)), m)
    assert s0 == pytest.approx(g.double().sum().item(), rel=1e-6, abs=1e-3)
    assert s1 == pytest.approx((g.double() * (x.double() - float(m))).sum().item(), rel=1e-6, abs=1e-2)


_GENERIC = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from bn_tolerances import CPU_KERNEL, CPU_STATS, assert_close
    from bnkit.kernels import get_backend
    from bnkit.kernels.cpu import half as S
    assert not S.SIMD_BF16 and not S.SIMD_F16
    cpu = get_backend("cpu")
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        x = bits.reshape(1, 1, -1).expand(2, 1, -1).contiguous()
        zero = torch.zeros(1)
        for p in (0, -9, 13):
            y = cpu.forward_eval(x, zero, torch.full((1,), 2.0**p), zero)
            torch.testing.assert_close(y, (x.float() * 2.0**p).to(dtype), atol=0, rtol=0, equal_nan=True)
        x = (torch.randn(4, 3, 37, 29) * 2 + 5).to(dtype)
        w, b = torch.rand(3) + 0.5, torch.randn(3)
        y, mean, var = cpu.forward_train(x, w, b, 1e-5)
        ref = F.batch_norm(x, None, None, w, b, training=True)  # torch's mixed precision, as bnkit's call
        assert_close(y, ref, table=CPU_KERNEL)
        assert_close(mean, x.float().mean((0, 2, 3)), dtype, table=CPU_STATS)
    print("ok")
    """
)


def test_generic_cpu_takes_the_portable_code(tmp_path):
    """With numba compiling for a generic CPU the flags are off and the scalar codecs run."""
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path), BNKIT_BACKEND="cpu")
    tests = str(Path(__file__).resolve().parents[2])  # bn_tolerances
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _GENERIC], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("dtype", SIMD_DTYPES, ids=str)
@pytest.mark.parametrize("has_u", [False, True])
@pytest.mark.parametrize("rows,channels,tasks", [(1000, 7, 3), (37, 64, 2), (5, 600, 2), (64, 8, 1)])
def test_channels_innermost_tiles_match_rows(dtype, has_u, rows, channels, tasks):
    """nsc_affine repeats the coefficients over q = NSC_TILE // C rows (16-bit data, SIMD path) and runs
    one loop per q rows, the last one per task shorter: each value as the per-row formula gives it."""
    x = (torch.randn(rows * channels) * 3).to(dtype).view(torch.int16).numpy().view(BITS[dtype])
    u = np.roll(x, 3)
    a, m, k, sh = (np.random.default_rng(i).standard_normal(channels).astype(np.float32) for i in range(4))
    got = np.empty_like(x)
    K.nsc_affine(u, x, got, rows, channels, tasks, has_u, a, m, k, sh)
    want = np.empty_like(x)
    for r in range(rows):
        sl = slice(r * channels, (r + 1) * channels)
        _lanes_scalar(u[sl], x[sl], want[sl], has_u, a, m, k, sh)
    _assert_same_bits(got, want, dtype)


@pytest.mark.parametrize("dtype", [*BITS, torch.float32], ids=str)
@pytest.mark.parametrize("rows,channels,tasks", [(1000, 7, 3), (130, 64, 2), (65, 600, 1), (3, 37, 2)])
def test_channels_innermost_statistics_match_float64(dtype, rows, channels, tasks):
    """nsc_stats sums 16 channels at a time down the rows (SIMD path, masked last lanes; float32 too):
    each part's (count, mean, M2) against float64, on data offset by 100 (the shifted sums must not lose it)."""
    x = (torch.randn(rows, channels, dtype=torch.float64) * 2 + 100).to(dtype)
    parts = np.empty((3, tasks, channels))
    flat = x.numpy() if dtype == torch.float32 else x.view(torch.int16).numpy().view(BITS[dtype])
    flat = flat.reshape(-1)
    K.nsc_stats(flat, rows, channels, tasks, *parts)
    xd = x.double().numpy()
    for t in range(tasks):
        r0, r1 = (rows * t) // tasks, (rows * (t + 1)) // tasks
        part = xd[r0:r1]
        np.testing.assert_array_equal(parts[0, t], r1 - r0)
        # the mean to 1e-9 of the data's offset of 100 (float64 sums of shifted values); M2 to float32's
        # resolution over the part's rows, with an absolute floor for parts of one row (M2 = 0)
        np.testing.assert_allclose(parts[1, t], part.mean(0), rtol=0, atol=1e-9 * 100)
        np.testing.assert_allclose(parts[2, t], ((part - part.mean(0)) ** 2).sum(0), rtol=1e-5, atol=1e-6)
