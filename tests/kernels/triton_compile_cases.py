"""The Triton kernels compile for a real GPU (sm_90) on a machine without one.

The interpreter accepts code the compiler rejects (and says nothing about memory access), so
``tests/kernels/test_triton.py`` also runs this file in a fresh process with
``TRITON_INTERPRET=0``: every kernel is compiled ahead of time, through ptxas (bundled with
triton), with the arguments the launcher would pass for real shapes and the specialization
triton applies at launch (16-byte aligned pointers, integers equal to 1 made constant,
multiples of 16 marked). The PTX then shows whether loads are vectorized, i.e. coalesced
along the unit-stride axis of each layout.
"""

import os
import re

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bnkit.kernels import triton_kernels as K
from bnkit.kernels.triton import _plan, layout_of

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError("run with TRITON_INTERPRET=0: this file compiles the kernels")

TARGET = GPUTarget("cuda", 90, 32)
PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}


def _compile(fn, args: dict, consts: dict) -> str:
    """PTX of ``fn`` specialized like a launch with ``args`` (strings are pointer types)."""
    sig, attrs, constexprs = {}, {}, dict(consts)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):
            sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name], constexprs[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": 4}).asm["ptx"]


# (shape, channels_last, dtype, loads expected to be 128-bit vectors): both views, every dtype
SHAPES = [
    ((32, 64, 56, 56), False, torch.float32, True),
    ((256, 256, 56, 56), True, torch.bfloat16, True),
    ((4096, 1024), False, torch.float16, True),
    ((8, 16, 7, 7), False, torch.float64, False),  # 49 positions per row: no aligned vectors
]
LAYOUT_FREE = ("stats_finalize", "sum_splits")  # per-channel kernels: compiled for the first shape only


@pytest.mark.parametrize("shape, channels_last, dtype, vectorized", SHAPES, ids=str)
def test_kernels_compile_with_launch_arguments(shape, channels_last, dtype, vectorized):
    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    lay = layout_of(x)
    plan = _plan(lay, 2048, 64)
    xp = PTR[dtype]
    sp = "*fp64" if dtype == torch.float64 else "*fp32"
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    view = dict(C=lay.c, Sp=lay.sp, sN=lay.sn, sC=lay.sc, sS=lay.ss, n_sb=plan.n_sb, n_tiles=plan.n_tiles,
                tiles_per_split=3, c_blocks=plan.c_blocks, n_splits=40, eps_hi=1e-5, eps_lo=0.0)
    tile = dict(ACC=acc, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, CL=lay.cl)
    jobs = {
        "affine": (K.affine_kernel, dict(X=xp, Y=xp, MEAN=sp, SCALE=sp, SHIFT=sp), tile),
        "backward_input": (K.backward_input_kernel, dict(DY=xp, X=xp, DX=xp, MEAN=sp, A=sp, K=sp, CC=sp), tile),
        "stats_partial": (K.stats_partial_kernel, dict(X=xp, CNT=sp, MEAN=sp, M2=sp), tile),
        "backward_reduce": (
            K.backward_reduce_partial_kernel, dict(DY=xp, X=xp, MEAN=sp, SUM_DY=sp, SUM_DY_XMU=sp), tile,
        ),
        "fused_forward_train": (
            K.fused_forward_train_kernel, dict(X=xp, Y=xp, W=sp, B=sp, MEAN_OUT=sp, VAR_OUT=sp),
            dict(tile, HAS_W=True, HAS_B=False),
        ),
        "stats_finalize": (
            K.stats_finalize_kernel,
            dict(CNT=sp, MEAN=sp, M2=sp, X=xp, W=sp, B=sp, MEAN_OUT=sp, VAR_OUT=sp, SCALE_OUT=sp, SHIFT_OUT=sp),
            dict(ACC=acc, HAS_W=False, HAS_B=True, BLOCK_K=64, BLOCK_C=32),
        ),
        "sum_splits": (
            K.sum_splits_kernel, dict(P=sp, Q=sp, P_OUT=sp, Q_OUT=sp), dict(BLOCK_K=64, BLOCK_C=32),
        ),
    }
    for name, (fn, ptrs, consts) in jobs.items():
        if name in LAYOUT_FREE and (shape, channels_last) != SHAPES[0][:2] and dtype != torch.float64:
            continue
        ptx = _compile(fn, {**view, **ptrs}, consts)
        assert ".entry" in ptx, name
        if name in ("affine", "backward_input", "stats_partial") and vectorized:
            assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), f"{name}: loads of {xp} are not 128-bit vectors"
