"""The Triton backend: launchers for the kernels of :mod:`bnkit.kernels.triton_kernels`.

Importing this module does not import triton; :func:`load_backend` does (the dispatcher in
:mod:`bnkit.kernels` turns a missing triton into one warning and the reference backend).

Which tensors run here (:meth:`TritonBackend.supports`): float16, bfloat16, float32 and
float64 tensors of shape ``(N, C, *)`` with fewer than 2**31 elements that are either
contiguous or channels-inner (channels_last, channels_last_3d, or any tensor whose
``movedim(1, -1)`` is contiguous), on a CUDA device; on the CPU only when the kernels were
built by the Triton interpreter (``TRITON_INTERPRET=1`` set before triton was imported),
which is how the kernels are checked without a GPU.

Launch plans, per call (``docs/math.md`` has the statistics; the kernels module the tiling):

* training forward: ``stats_partial`` (split reduction over ``(c_blocks, n_splits)`` programs,
  about ``programs_per_sm`` programs per SM) -> ``stats_finalize`` (Chan merge of the splits,
  ``scale = w * invstd``) -> ``affine`` (normalize). Tensors of at most ``fused_max_bytes``, or
  that fit in half the L2 with at least one channel block per SM, take the fused one-launch kernel;
* eval forward: one ``affine`` launch;
* backward: ``backward_reduce_partial`` (+ ``sum_splits`` when split) and one
  ``backward_input`` launch.

The thresholds and tile sizes are constructor arguments so they can be tuned on a GPU
without editing kernels; the defaults have not yet been tuned on one.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from bnkit import reference as ref

__all__ = ["Layout", "TritonBackend", "layout_of", "load_backend"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_NUMEL = 2**31 - 1  # kernels index with int32 offsets


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Layout:
    """``x`` as the kernels see it: ``(np, c, sp)`` with element strides ``(sn, sc, ss)``.

    ``cl`` (channels-inner) means ``sc == 1`` and ``np == 1``: every row of ``sp`` positions
    holds the ``C`` channels side by side. Otherwise ``ss == 1`` (positions innermost).
    """

    np: int
    c: int
    sp: int
    sn: int
    sc: int
    ss: int
    cl: bool


def layout_of(x: Tensor) -> Layout | None:
    """The kernels' view of ``x`` (shape ``(N, C, *)``), or ``None`` for other memory layouts.

    Offsets are computed from the shape, not from ``x.stride()``, so size-1 dims with odd
    strides are harmless; outputs made by ``torch.empty_like(x)`` share the layout.
    """
    if x.dim() < 2:
        return None
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c) if n * c else 0
    if x.is_contiguous() and s > 1:
        return Layout(n, c, s, c * s, s, 1, False)
    if x.movedim(1, -1).is_contiguous():
        return Layout(1, c, n * s, 0, 1, c, True)
    return None


@dataclass(frozen=True)
class _Plan:
    """Tile shape and counts for one layout: ``[block_c, block_s]`` tiles, ``n_tiles`` per channel block."""

    lay: Layout
    block_c: int
    block_s: int
    n_sb: int
    c_blocks: int

    @property
    def n_tiles(self) -> int:
        return self.lay.np * self.n_sb

    def view_args(self) -> tuple[int, ...]:
        lay = self.lay
        return lay.c, lay.sp, lay.sn, lay.sc, lay.ss, self.n_sb


def _plan(lay: Layout, tile: int, max_block_c: int) -> _Plan:
    if lay.cl:  # coalesced along C: as many channels as allowed, rows fill the tile
        block_c = min(_next_pow2(lay.c), max_block_c)
        block_s = min(max(tile // block_c, 1), _next_pow2(lay.sp))
    else:  # coalesced along positions; small spatial sizes pack several channels per tile
        block_s = min(_next_pow2(lay.sp), tile)
        block_c = min(_next_pow2(lay.c), max(tile // block_s, 1))
    return _Plan(lay, block_c, block_s, _cdiv(lay.sp, block_s), _cdiv(lay.c, block_c))


def _to_float32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _split_eps(eps: float) -> tuple[float, float]:
    """``eps`` as two float32 values whose sum is ``eps`` to ~48 bits (triton passes floats as float32)."""
    try:
        hi = _to_float32(eps)
    except OverflowError:
        return float("inf"), 0.0
    return hi, _to_float32(eps - hi)


def _channels(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with the strides of ``x`` (the kernels index both with one layout)."""
    if t.stride() == x.stride():
        return t
    out = torch.empty_like(x, dtype=t.dtype)
    out.copy_(t)
    return out


class TritonBackend:
    """The four primitives of :class:`bnkit.kernels.base.Backend` as Triton launches.

    Args:
        kernels: the imported :mod:`bnkit.kernels.triton_kernels`.
        fused_max_bytes: training forward / backward reduction of tensors up to this size run
            in one launch (one program per channel block).
        programs_per_sm: target number of programs of a split reduction per SM.
        tile: elements per ``[block_c, block_s]`` tile; ``max_block_c`` caps channels per tile.
        num_warps: warps per program of every kernel.
    """

    name = "triton"

    def __init__(
        self,
        kernels: ModuleType,
        *,
        fused_max_bytes: int = 1 << 20,
        programs_per_sm: int = 4,
        tile: int = 2048,
        max_block_c: int = 64,
        num_warps: int = 4,
    ) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        self._k = kernels
        self.interpreted = isinstance(kernels.affine_kernel, InterpretedFunction)
        self.fused_max_bytes = fused_max_bytes
        self.programs_per_sm = programs_per_sm
        self.tile = tile
        self.max_block_c = max_block_c
        self.num_warps = num_warps
        self._device_info: dict[int, tuple[int, int]] = {}

    # --- dispatch ---------------------------------------------------------------------------

    def supports(self, x: Tensor) -> bool:
        if x.dtype not in SUPPORTED_DTYPES or x.dim() < 2 or not 0 < x.numel() <= MAX_NUMEL:
            return False
        if x.device.type == "cuda":
            ok = True
        elif x.device.type == "cpu":
            ok = self.interpreted
        else:
            ok = False
        return ok and layout_of(x) is not None

    # --- planning ---------------------------------------------------------------------------

    def _plan_for(self, x: Tensor) -> _Plan:
        lay = layout_of(x)
        if lay is None:
            raise ValueError(f"triton backend: unsupported memory layout, shape {tuple(x.shape)} "
                             f"strides {x.stride()} (contiguous or channels-inner expected)")
        return _plan(lay, self.tile, self.max_block_c)

    def _sm_and_l2(self, x: Tensor) -> tuple[int, int]:
        """(SM count, L2 bytes) of ``x``'s device; small fixed values for the interpreter."""
        if x.device.type != "cuda":
            return 4, 4 << 20
        idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if idx not in self._device_info:
            props = torch.cuda.get_device_properties(idx)
            self._device_info[idx] = (props.multi_processor_count, int(getattr(props, "L2_cache_size", 0)))
        return self._device_info[idx]

    def _fused(self, x: Tensor, plan: _Plan) -> bool:
        nbytes = x.numel() * x.element_size()
        sms, l2 = self._sm_and_l2(x)
        return nbytes <= self.fused_max_bytes or (nbytes <= l2 // 2 and plan.c_blocks >= sms)

    def _splits(self, x: Tensor, plan: _Plan) -> tuple[int, int]:
        """``(n_splits, tiles_per_split)`` so the reduction grid has ~programs_per_sm programs per SM."""
        sms, _ = self._sm_and_l2(x)
        want = max(1, (self.programs_per_sm * sms) // plan.c_blocks)
        tiles_per_split = _cdiv(plan.n_tiles, min(want, plan.n_tiles))
        return _cdiv(plan.n_tiles, tiles_per_split), tiles_per_split

    def _acc(self, x: Tensor):
        tl = self._k.tl
        return tl.float64 if x.dtype == torch.float64 else tl.float32

    @staticmethod
    @contextlib.contextmanager
    def _on(x: Tensor) -> Iterator[None]:
        """Launch on ``x``'s GPU (triton launches on the current device)."""
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):
                yield
        else:
            yield

    # --- the four primitives ----------------------------------------------------------------

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        k, plan = self._k, self._plan_for(x)
        lay = plan.lay
        sd = ref.stats_dtype(x.dtype)
        acc = self._acc(x)
        y = torch.empty_like(x)
        mean = torch.empty(lay.c, dtype=sd, device=x.device)
        var = torch.empty(lay.c, dtype=sd, device=x.device)
        w, b = _channels(weight), _channels(bias)
        w_arg = x if w is None else w
        b_arg = x if b is None else b
        eps_hi, eps_lo = _split_eps(float(eps))
        common = dict(ACC=acc, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, CL=lay.cl, num_warps=self.num_warps)
        with self._on(x):
            if self._fused(x, plan):
                k.fused_forward_train_kernel[(plan.c_blocks,)](
                    x, y, w_arg, b_arg, mean, var, *plan.view_args(), plan.n_tiles, eps_hi, eps_lo,
                    HAS_W=w is not None, HAS_B=b is not None, **common,
                )
                return y, mean, var
            n_splits, tiles_per_split = self._splits(x, plan)
            cnt, pmean, pm2 = torch.empty((3, n_splits, lay.c), dtype=sd, device=x.device)
            k.stats_partial_kernel[(plan.c_blocks, n_splits)](
                x, cnt, pmean, pm2, lay.c, lay.sp, lay.sn, lay.sc, lay.ss,
                plan.n_sb, plan.n_tiles, tiles_per_split, **common,
            )
            scale, shift = torch.empty((2, lay.c), dtype=sd, device=x.device)
            block_k = min(_next_pow2(n_splits), 64)
            block_cf = min(_next_pow2(lay.c), max(self.tile // block_k, 1))
            k.stats_finalize_kernel[(_cdiv(lay.c, block_cf),)](
                cnt, pmean, pm2, x, w_arg, b_arg, mean, var, scale, shift, lay.c, lay.sc, n_splits, eps_hi, eps_lo,
                ACC=acc, HAS_W=w is not None, HAS_B=b is not None, BLOCK_K=block_k, BLOCK_C=block_cf,
                num_warps=self.num_warps,
            )
            self._affine(x, y, mean, scale, shift, plan)
        return y, mean, var

    def _affine(self, x: Tensor, y: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, plan: _Plan) -> None:
        grid = (plan.n_tiles * plan.c_blocks,)
        self._k.affine_kernel[grid](
            x, y, mean, scale, shift, *plan.view_args(), plan.c_blocks,
            ACC=self._acc(x), BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, CL=plan.lay.cl,
            num_warps=self.num_warps,
        )

    def forward_eval(self, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        plan = self._plan_for(x)
        y = torch.empty_like(x)
        with self._on(x):
            self._affine(x, y, mean.contiguous(), scale.contiguous(), shift.contiguous(), plan)
        return y

    def backward_reduce(self, dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        k, plan = self._k, self._plan_for(x)
        lay = plan.lay
        dy = _like(dy, x)
        sd = ref.stats_dtype(x.dtype)
        # separate allocations: the results leave through custom ops, which must not return aliases
        sum_dy = torch.empty(lay.c, dtype=sd, device=x.device)
        sum_dy_xmu = torch.empty(lay.c, dtype=sd, device=x.device)
        if self._fused(x, plan):
            n_splits, tiles_per_split = 1, plan.n_tiles
        else:
            n_splits, tiles_per_split = self._splits(x, plan)
        if n_splits == 1:  # one split: the partial sums are the result
            psum_dy, psum_dy_xmu = sum_dy, sum_dy_xmu
        else:
            psum_dy, psum_dy_xmu = torch.empty((2, n_splits, lay.c), dtype=sd, device=x.device)
        with self._on(x):
            k.backward_reduce_partial_kernel[(plan.c_blocks, n_splits)](
                dy, x, mean.contiguous(), psum_dy, psum_dy_xmu, lay.c, lay.sp, lay.sn, lay.sc, lay.ss,
                plan.n_sb, plan.n_tiles, tiles_per_split,
                ACC=self._acc(x), BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, CL=lay.cl, num_warps=self.num_warps,
            )
            if n_splits == 1:
                return sum_dy, sum_dy_xmu
            block_k = min(_next_pow2(n_splits), 64)
            block_cf = min(_next_pow2(lay.c), max(self.tile // block_k, 1))
            k.sum_splits_kernel[(_cdiv(lay.c, block_cf),)](
                psum_dy, psum_dy_xmu, sum_dy, sum_dy_xmu, lay.c, n_splits,
                BLOCK_K=block_k, BLOCK_C=block_cf, num_warps=self.num_warps,
            )
        return sum_dy, sum_dy_xmu

    def backward_input(
        self, dy: Tensor, x: Tensor, mean: Tensor, a: Tensor, k: Tensor, c: Tensor
    ) -> Tensor:
        plan = self._plan_for(x)
        dy = _like(dy, x)
        dx = torch.empty_like(x)
        with self._on(x):
            self._k.backward_input_kernel[(plan.n_tiles * plan.c_blocks,)](
                dy, x, dx, mean.contiguous(), a.contiguous(), k.contiguous(), c.contiguous(),
                *plan.view_args(), plan.c_blocks,
                ACC=self._acc(x), BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, CL=plan.lay.cl,
                num_warps=self.num_warps,
            )
        return dx


def load_backend(**options: int) -> TritonBackend:
    """Import triton and the kernels (raises ``ImportError`` without triton); ``options`` go to
    :class:`TritonBackend`. The kernels are interpreted when ``TRITON_INTERPRET=1`` was set
    before the first import of :mod:`bnkit.kernels.triton_kernels`."""
    from bnkit.kernels import triton_kernels

    return TritonBackend(triton_kernels, **options)
