r"""numba kernels of the ``cpu`` backend: the four primitives as parallel loops.

Memory model. Every tensor the backend accepts (see :mod:`bnkit.kernels.cpu_launch`) is a
dense buffer seen as a 3-d array ``(N, C, S)`` (``S`` = product of the spatial dims) in one
of two orders, so one kernel serves every shape of that order and only the dtype makes a
new specialization:

* ``ncs`` -- channel-major (contiguous ``(N, C, *)``): element ``(n, c, s)`` sits at
  ``(n*C + c)*S + s``. A channel is ``N`` rows of ``S`` contiguous values; index ``j`` in
  ``[0, N*S)`` along a channel means ``n = j // S``, ``s = j % S``.
* ``nsc`` -- channel-minor (channels_last ``(N, *, C)``, ``(N, C)``, and an ``(N, C, L)``
  view of ``(N, L, C)`` memory): ``R = N*S`` rows of ``C`` contiguous values; the inner
  loops run over ``c`` so they vectorize across channels.

dtypes. Data arrays arrive as float32, float64, uint16 (the bits of bfloat16) or int16 (the
bits of float16); :func:`load` widens an element to the compute dtype (float64 for float64,
float32 otherwise) and :func:`store` rounds back to nearest-even exactly as torch does.
Per-channel vectors (``mean``, ``scale``, ...) come in the statistics dtype. On CPUs with AVX-512
(``SIMD_BF16``/``SIMD_F16``) the normalize-type loops of 16-bit data (:func:`affine_span`,
:func:`affine_lanes`) and the blocks of their statistics (:func:`block_sums`) run 16 values at a time in
explicit vector code, rounding with the CPU's conversion instructions to the same bits.

Numerics policy (the same as :mod:`bnkit.reference`): statistics are accumulated in float64 and
``E[x^2] - E[x]^2`` of the raw data never appears. Memory is read once, with the "shifted data"
algorithm: with a shift ``K`` near the data (the mean of a first block, then the mean so far;
a single value of the channel only where the sums are float64),
``sum(x - K)`` and ``sum((x - K)**2)`` are sums of values of the order of the spread, not of the
offset, so a channel with mean 1e4 and std 1e-2 loses nothing to the offset; then
``mean = K + S1/n`` and ``M2 = S2 - S1**2/n``. Long contiguous runs (:func:`_seg_stats`) sum
blocks of ``SBLOCK`` values in float32 lanes (they vectorize 8 wide) and add the block sums in
float64; short rows (:func:`ncs_row_stats`) and channels-innermost rows (:func:`nsc_stats`, in
blocks of ``NSC_SBLOCK`` rows) likewise; partial results are merged in float64 with Chan's
formula (:func:`chan_merge`). The normalization uses the float64 mean and
``scale = w / sqrt(var + eps)`` and rounds each output once: ``y = (x - mean) * scale + shift``.
For bfloat16/float16 data the launcher hands the normalization float32 arrays instead (the
*normalization dtype*): the output's own rounding (2**-9 or 2**-12 relative) dwarfs float32's, and
float64 lanes made that pass compute-bound (1.7x slower).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = [
    "backward_coeffs",
    "chan_merge",
    "finish_stats",
    "load",
    "ncs_affine",
    "ncs_affine_short",
    "ncs_backward_train",
    "ncs_reduce",
    "ncs_row_stats",
    "ncs_train",
    "nsc_affine",
    "nsc_reduce",
    "nsc_stats",
    "store",
]

# Values per float32 partial sum in the backward reductions (then merged in float64).
RBLOCK = 256
# Values per float32 block of the forward statistics' shifted sums (ncs): the vectorized loop
# keeps 32 partial sums, so each adds up SBLOCK / 32 values before the block goes to float64.
SBLOCK = 256
# The same for 16-bit data (its 8-bit or 11-bit mantissas leave the float32 sums plenty of room): the
# per-block horizontal sums cost more than the adds at 256 (on bf16: 0.33 against 0.24 cycles per
# value at 1024, scalar loops).
SBLOCK16 = 1024
# Rows per block of the float32 sums in channels-innermost memory (statistics and backward
# reductions): there each channel's sums are one sequential chain (the lanes run across
# channels), so blocks stay short.
NSC_SBLOCK = 64
# Values per tile of the channels-innermost normalize of 16-bit data on the SIMD path (rows of C values
# repeated up to this many; 512 and 1024 measured alike, 256 slower).
NSC_TILE = 512

# reassoc lets LLVM vectorize the float64 reductions; no nnan/ninf: NaN and inf propagate.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_JIT = {"cache": True, "fastmath": _FAST}


# --- 16-bit codecs (integer ops + bitcasts only, so fastmath cannot change them) ------------------------


@intrinsic
def _bits_as_f32(typingctx, u):
    if u != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_bits(typingctx, f):
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(**_JIT)
def _bf16_to_f32(h):
    # bfloat16 is the top half of a float32: widen by a shift.
    return _bits_as_f32(np.uint32((np.int64(h) & 0xFFFF) << 16))


@njit(**_JIT)
def _f32_to_bf16(v):
    # torch's c10::detail::round_to_nearest_even: NaN -> 0x7FC0, else add 0x7FFF + lsb and truncate.
    u = np.int64(_f32_as_bits(np.float32(v)))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16(0x7FC0)
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@njit(**_JIT)
def _f16_to_f32(h):
    # IEEE half -> single: rebias the exponent (15 -> 127); subnormals are m * 2**-24 exactly.
    b = np.int64(h) & 0xFFFF
    sign = (b & 0x8000) << 16
    e = (b >> 10) & 0x1F
    m = b & 0x3FF
    if e == 0:
        v = np.float32(m) * np.float32(5.9604644775390625e-08)
        return -v if sign else v
    if e == 31:
        return _bits_as_f32(np.uint32(sign | 0x7F800000 | (m << 13)))
    return _bits_as_f32(np.uint32(sign | ((e + 112) << 23) | (m << 13)))


@njit(**_JIT)
def _f32_to_f16(v):
    # single -> IEEE half with round-to-nearest-even (what torch's c10::Half conversion does).
    w = np.int64(_f32_as_bits(np.float32(v)))
    sign = (w >> 16) & 0x8000
    u = w & 0x7FFFFFFF
    if u > 0x7F800000:
        return np.int16(np.int64(sign | 0x7E00) - ((sign | 0x7E00) >> 15 << 16))
    if u >= 0x477FF000:  # >= 65520 rounds to inf (ties to even: 65504 has an odd mantissa)
        h = sign | 0x7C00
    elif u >= 0x38800000:  # normal half: rebias 127 -> 15, round the 13 dropped bits
        h = sign | ((u - 0x38000000 + 0xFFF + ((u >> 13) & 1)) >> 13)
    elif u < 0x33000000:  # below 2**-25 (2**-25 itself ties to 0)
        h = sign
    else:  # subnormal half: mantissa with its implicit bit, shifted by 14..24, rounded to even
        s = 126 - (u >> 23)
        m = (u & 0x7FFFFF) | 0x800000
        q = m >> s
        rem = m & ((np.int64(1) << s) - 1)
        half = np.int64(1) << (s - 1)
        if rem > half or (rem == half and (q & 1) == 1):
            q += 1
        h = sign | q
    return np.int16(h - ((h >> 15) << 16))


def load(a, i):
    """``a[i]`` widened to the compute dtype (float32, or float64 for float64 arrays)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


def store(a, i, v):
    """``a[i] = v`` rounded to ``a``'s dtype (bf16/fp16 bits: round-to-nearest-even)."""
    raise NotImplementedError


@overload(load, jit_options={"fastmath": _FAST})
def _load_impl(a, i):
    dt = a.dtype
    if dt == types.uint16:
        return lambda a, i: _bf16_to_f32(a[i])
    if dt == types.int16:
        return lambda a, i: _f16_to_f32(a[i])
    if isinstance(dt, types.Float):
        return lambda a, i: a[i]
    return None


@overload(store, jit_options={"fastmath": _FAST})
def _store_impl(a, i, v):
    dt = a.dtype
    if dt == types.uint16:

        def st_bf16(a, i, v):
            a[i] = _f32_to_bf16(v)

        return st_bf16
    if dt == types.int16:

        def st_f16(a, i, v):
            a[i] = _f32_to_f16(v)

        return st_f16
    if isinstance(dt, types.Float):

        def st(a, i, v):
            a[i] = v

        return st
    return None


def to_acc(a, v):
    """``v`` in the compute dtype of ``a``'s elements (float64 for float64 arrays, else float32).

    (``load(a, i) * 0`` would not give a zero of that dtype: numba types a float32 times an
    integer as float64, and the whole reduction then runs in float64.)
    """
    raise NotImplementedError


@overload(to_acc, jit_options={"fastmath": _FAST})
def _to_acc_impl(a, v):
    if a.dtype == types.float64:
        return lambda a, v: np.float64(v)
    return lambda a, v: np.float32(v)


# --- 16-bit data, 16 values at a time: the CPU's own conversions (AVX-512) ------------------------------
#
# The scalar codecs above vectorize, but rounding float32 to bfloat16 in integer ops costs about 10
# vector instructions per 16 values, and the normalize pass of bf16 data ran compute-bound at 0.39-0.46
# cycles per value where a copy takes 0.12-0.17. The intrinsics below write whole vectors in LLVM IR:
# bf16 is rounded by VCVTNEPS2BF16 and float16 by VCVTPS2PH (both round to nearest even, as torch
# does). VCVTNEPS2BF16 flushes subnormals, and both give NaNs other bits than torch's codec, so a
# vector holding a NaN or a float32 subnormal (one VFPCLASSPS test) is rounded again by the integer
# codec: every value gets the bits of the scalar codec (0.24 cycles per value on bf16). The SIMD_*
# flags hold only when numba compiles for this very CPU; its cache is keyed by the CPU's name and
# features, so cached code and flag agree.


def _host_has(*features: str) -> bool:
    from llvmlite import binding
    from numba.core import config

    if config.CPU_NAME or config.CPU_FEATURES:  # an explicit numba target: keep to portable code
        return False
    try:
        have = binding.get_host_cpu_features()
    except Exception:  # noqa: BLE001 (a platform without the query)
        return False
    return all(have.get(f, False) for f in features)


_AVX512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl")
SIMD_BF16 = _host_has(*_AVX512, "avx512bf16")
SIMD_F16 = _host_has(*_AVX512)


class _BFloat(ir.types._BaseFloatType):
    """LLVM's ``bfloat`` (llvmlite has no such type); only converted to, never computed in."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self) -> str:
        return "bfloat"


_BFloat._create_instance()
_W = 16
_I1, _I16, _I32, _F32 = ir.IntType(1), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vt(t):
    return ir.VectorType(t, _W)


def _simd16(a) -> bool:
    """Whether 16-bit data array ``a`` takes the SIMD intrinsics on this CPU."""
    return (a.dtype == types.uint16 and SIMD_BF16) or (a.dtype == types.int16 and SIMD_F16)


def _splat(builder, v):
    u = builder.insert_element(ir.Constant(_vt(v.type), ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(u, ir.Constant(_vt(v.type), ir.Undefined), ir.Constant(_vt(_I32), [0] * _W))


def _lanes_ptr(context, builder, aryty, ary, i, elt):
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [i]), _vt(elt).as_pointer())


def _lane_mask(builder, left):
    """``<16 x i1>``: lane ``j`` is on when ``j < left`` (``left`` an intp, possibly above 16)."""
    sixteen = ir.Constant(left.type, _W)
    n = builder.trunc(builder.select(builder.icmp_signed("<", left, sixteen), left, sixteen), _I32)
    return builder.icmp_signed("<", ir.Constant(_vt(_I32), list(range(_W))), _splat(builder, n))


def _masked(builder, op, vt):
    # llvm.masked.load / llvm.masked.store of <16 x elt>
    sfx = f"v{_W}{'i16' if vt.element == _I16 else 'f32'}.p0"
    if op == "load":
        fnty = ir.FunctionType(vt, [vt.as_pointer(), _I32, _vt(_I1), vt])
    else:
        fnty = ir.FunctionType(ir.VoidType(), [vt, vt.as_pointer(), _I32, _vt(_I1)])
    return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.{op}.{sfx}")


def _load_lanes(builder, ptr, vt, align, mask):
    if mask is None:
        return builder.load(ptr, align=align, typ=vt)
    zero = ir.Constant(vt, [0] * _W if vt.element == _I16 else [0.0] * _W)
    return builder.call(_masked(builder, "load", vt), [ptr, ir.Constant(_I32, align), mask, zero])


def _load16(context, builder, aryty, ary, i, mask=None):
    """16 values of ``ary`` from ``i`` as ``<16 x float>`` (bf16/fp16 bits widened, or float32); with
    ``mask`` only the lanes it selects are read (the others are 0)."""
    if aryty.dtype in (types.uint16, types.int16):
        raw = _load_lanes(builder, _lanes_ptr(context, builder, aryty, ary, i, _I16), _vt(_I16), 2, mask)
        if aryty.dtype == types.int16:  # float16: exact widening (VCVTPH2PS)
            return builder.fpext(builder.bitcast(raw, _vt(ir.HalfType())), _vt(_F32))
        # bf16: the top half of a float32
        wide = builder.shl(builder.zext(raw, _vt(_I32)), ir.Constant(_vt(_I32), [16] * _W))
        return builder.bitcast(wide, _vt(_F32))
    return _load_lanes(builder, _lanes_ptr(context, builder, aryty, ary, i, _F32), _vt(_F32), 4, mask)


def _store16(context, builder, aryty, ary, i, v, mask=None):
    """Round ``<16 x float>`` ``v`` to ``ary``'s 16-bit dtype (bits of the scalar codec) and store it (with
    ``mask``, only the lanes it selects)."""
    bf16 = aryty.dtype == types.uint16
    narrow = _BFloat() if bf16 else ir.HalfType()
    hw = builder.bitcast(builder.fptrunc(v, _vt(narrow)), _vt(_I16))
    fpclass = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_vt(_I1), [_vt(_F32), _I32]), "llvm.x86.avx512.fpclass.ps.512"
    )
    # VFPCLASSPS categories: 0x01 QNaN, 0x80 SNaN, 0x20 subnormal (only bf16's instruction flushes them)
    odd = builder.call(fpclass, [v, ir.Constant(_I32, 0xA1 if bf16 else 0x81)])
    any_odd = builder.icmp_unsigned("!=", builder.bitcast(odd, _I16), ir.Constant(_I16, 0))
    before = builder.block
    with builder.if_then(any_odd, likely=False):
        u = builder.bitcast(v, _vt(_I32))

        def c(x):
            return ir.Constant(_vt(_I32), [x] * _W)

        isnan = builder.icmp_unsigned(">", builder.and_(u, c(0x7FFFFFFF)), c(0x7F800000))
        if bf16:  # _f32_to_bf16: add 0x7FFF + lsb, truncate; NaN -> 0x7FC0
            t = builder.add(builder.add(u, c(0x7FFF)), builder.and_(builder.lshr(u, c(16)), c(1)))
            soft = builder.trunc(builder.lshr(t, c(16)), _vt(_I16))
            nan = ir.Constant(_vt(_I16), [0x7FC0] * _W)
        else:  # _f32_to_f16's NaN: sign | 0x7E00 (other values: the instruction's bits are the codec's)
            soft = hw
            nan = builder.trunc(builder.or_(builder.and_(builder.lshr(u, c(16)), c(0x8000)), c(0x7E00)), _vt(_I16))
        fixed = builder.select(isnan, nan, soft)
        fixed_block = builder.block
    out = builder.phi(_vt(_I16))
    out.add_incoming(hw, before)
    out.add_incoming(fixed, fixed_block)
    ptr = _lanes_ptr(context, builder, aryty, ary, i, _I16)
    if mask is None:
        builder.store(out, ptr, align=2)
    else:
        builder.call(_masked(builder, "store", _vt(_I16)), [out, ptr, ir.Constant(_I32, 2), mask])


def _fma16(builder, a, b, c):
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vt(_F32), [_vt(_F32)] * 3), "llvm.fma.v16f32")
    return builder.call(f, [a, b, c])


@intrinsic
def _fma32(typingctx, a, b, c):
    """``a*b + c`` rounded once, in float32: one lane of :func:`_affine16` written as scalar code (the
    tests' reference for the SIMD lanes)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(a, b, c), codegen


@intrinsic
def _affine16(typingctx, us, xs, os, i, left, a, m, k, sh, has_u, lanes):
    """``os[i:i+16] = fma(a, us, fma(k, xs - m, sh))`` (no ``a*us`` term without ``has_u``), over
    ``min(16, left)`` values (masked loads and stores for fewer: no scalar tail, so every value of a
    row gets the same arithmetic).

    With ``lanes`` (a literal) the four coefficients are float32 arrays read from ``i`` as well (one
    per value: channels innermost, per-position tables), else float32 scalars.
    """
    if not isinstance(has_u, types.BooleanLiteral) or not isinstance(lanes, types.BooleanLiteral):
        return None

    def codegen(context, builder, signature, args):
        us_, xs_, os_, i_, left_ = args[:5]
        tys = signature.args

        def lanes16(mask):
            if lanes.literal_value:
                a_, m_, k_, sh_ = (_load16(context, builder, tys[j], args[j], i_, mask) for j in (5, 6, 7, 8))
            else:
                a_, m_, k_, sh_ = (_splat(builder, v) for v in args[5:9])
            v = _fma16(builder, k_, builder.fsub(_load16(context, builder, tys[1], xs_, i_, mask), m_), sh_)
            if has_u.literal_value:
                v = _fma16(builder, a_, _load16(context, builder, tys[0], us_, i_, mask), v)
            _store16(context, builder, tys[2], os_, i_, v, mask)

        full = builder.icmp_signed(">=", left_, ir.Constant(left_.type, _W))
        with builder.if_else(full, likely=True) as (whole, part):
            with whole:
                lanes16(None)
            with part:
                lanes16(_lane_mask(builder, left_))
        return context.get_dummy_value()

    return types.void(us, xs, os, types.intp, types.intp, a, m, k, sh, has_u, lanes), codegen


def affine_span(us, xs, os, n, has_u, a, m, k, sh):
    """``os[i] = a*us[i] + k*(xs[i] - m) + sh`` for ``i < n`` (the ``us`` term only with ``has_u``)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(affine_span, inline="always", jit_options={"fastmath": _FAST})
def _affine_span_impl(us, xs, os, n, has_u, a, m, k, sh):
    if _simd16(os) and a == m == k == sh == types.float32:

        def simd(us, xs, os, n, has_u, a, m, k, sh):
            if has_u:
                for i in range(0, n, _W):
                    _affine16(us, xs, os, i, n - i, a, m, k, sh, True, False)
            else:
                for i in range(0, n, _W):
                    _affine16(us, xs, os, i, n - i, a, m, k, sh, False, False)

        return simd

    def scalar(us, xs, os, n, has_u, a, m, k, sh):
        if has_u:
            for i in range(n):
                store(os, i, a * load(us, i) + k * (load(xs, i) - m) + sh)
        else:
            for i in range(n):
                store(os, i, (load(xs, i) - m) * k + sh)

    return scalar


def affine_lanes(us, xs, os, n, has_u, a, m, k, sh):
    """:func:`affine_span` with one coefficient per value: ``os[i] = a[i]*us[i] + k[i]*(xs[i] - m[i]) + sh[i]``."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(affine_lanes, inline="always", jit_options={"fastmath": _FAST})
def _affine_lanes_impl(us, xs, os, n, has_u, a, m, k, sh):
    if _simd16(os) and a.dtype == m.dtype == k.dtype == sh.dtype == types.float32:

        def simd(us, xs, os, n, has_u, a, m, k, sh):
            if has_u:
                for i in range(0, n, _W):
                    _affine16(us, xs, os, i, n - i, a, m, k, sh, True, True)
            else:
                for i in range(0, n, _W):
                    _affine16(us, xs, os, i, n - i, a, m, k, sh, False, True)

        return simd

    def scalar(us, xs, os, n, has_u, a, m, k, sh):
        if has_u:
            for i in range(n):
                store(os, i, a[i] * load(us, i) + k[i] * (load(xs, i) - m[i]) + sh[i])
        else:
            for i in range(n):
                store(os, i, (load(xs, i) - m[i]) * k[i] + sh[i])

    return scalar

@intrinsic
def _shifted_sums16(typingctx, xs, n, k):
    """``(sum(xs[i] - k), sum((xs[i] - k)**2))`` over ``i < n``, 16-bit data, in float32 lanes.

    Two pairs of ``<16 x float>`` accumulators (32 partial sums, so a block of SBLOCK16 values adds
    SBLOCK16 / 32 values in each), added up in float64 at the end. The vectorizer made 8-wide loops
    of this with a horizontal sum per block: 0.33 cycles per bf16 value with blocks of 256.
    """
    if not (isinstance(xs, types.Array) and xs.dtype in (types.uint16, types.int16) and k == types.float32):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary, count, kv = args
        zero = ir.Constant(_vt(_F32), [0.0] * _W)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]  # s1, s2 for lanes 0-15, 16-31
        ks = _splat(builder, kv)
        full = builder.sub(count, builder.srem(count, ir.Constant(count.type, 2 * _W)))
        def step(j, half, mask):
            d = builder.fsub(_load16(context, builder, aryty, ary, j, mask), ks)
            if mask is not None:  # lanes past the end add nothing
                d = builder.select(mask, d, zero)
            s1, s2 = accs[2 * half], accs[2 * half + 1]
            builder.store(builder.fadd(builder.load(s1), d), s1)
            builder.store(_fma16(builder, d, d, builder.load(s2)), s2)

        with cgutils.for_range_slice(builder, ir.Constant(count.type, 0), full, ir.Constant(count.type, 2 * _W)) as (
            i,
            _,
        ):
            for half in (0, 1):
                step(builder.add(i, ir.Constant(count.type, half * _W)), half, None)
        _masked_tail(builder, count, full, step)
        return context.make_tuple(builder, signature.return_type, _lane_totals(builder, accs))

    return types.UniTuple(types.float64, 2)(xs, n, k), codegen


def block_sums(blk, k):
    """``(sum(blk - k), sum((blk - k)**2))`` of a block of ``SBLOCK`` (16-bit data: ``SBLOCK16``)
    values, summed in the compute dtype (float32 for all but float64 data)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@njit(**_JIT)
def _block_sums_loop(blk, k):
    ts = to_acc(blk, 0.0)
    tq = ts
    for i in range(blk.shape[0]):
        d = load(blk, i) - k
        ts += d
        tq += d * d
    return float(ts), float(tq)


@overload(block_sums, inline="always", jit_options={"fastmath": _FAST})
def _block_sums_impl(blk, k):
    if not _simd16(blk):
        return lambda blk, k: _block_sums_loop(blk, k)

    def simd(blk, k):
        return _shifted_sums16(blk, blk.shape[0], k)

    return simd


@intrinsic
def _dot_sums16(typingctx, gs, xs, n, m):
    """``(sum(gs[i]), sum(gs[i] * (xs[i] - m)))`` over ``i < n``, 16-bit data, float32 lanes.

    As :func:`_shifted_sums16`: two pairs of ``<16 x float>`` accumulators, added up in float64 at the end.
    """
    if not (
        isinstance(gs, types.Array)
        and isinstance(xs, types.Array)
        and gs.dtype == xs.dtype
        and xs.dtype in (types.uint16, types.int16)
        and m == types.float32
    ):
        return None

    def codegen(context, builder, signature, args):
        gty, xty = signature.args[0], signature.args[1]
        g_ary, x_ary, count, mv = args
        zero = ir.Constant(_vt(_F32), [0.0] * _W)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]
        ms = _splat(builder, mv)
        step = ir.Constant(count.type, 2 * _W)
        full = builder.sub(count, builder.srem(count, step))
        def lanes16(j, half, mask):
            g = _load16(context, builder, gty, g_ary, j, mask)
            d = builder.fsub(_load16(context, builder, xty, x_ary, j, mask), ms)
            if mask is not None:  # lanes past the end add nothing (g is 0 there; d may not be)
                d = builder.select(mask, d, zero)
            s0, s1 = accs[2 * half], accs[2 * half + 1]
            builder.store(builder.fadd(builder.load(s0), g), s0)
            builder.store(_fma16(builder, g, d, builder.load(s1)), s1)

        with cgutils.for_range_slice(builder, ir.Constant(count.type, 0), full, step) as (i, _):
            for half in (0, 1):
                lanes16(builder.add(i, ir.Constant(count.type, half * _W)), half, None)
        _masked_tail(builder, count, full, lanes16)
        return context.make_tuple(builder, signature.return_type, _lane_totals(builder, accs))

    return types.UniTuple(types.float64, 2)(gs, xs, n, m), codegen


@intrinsic
def _column_sums16(typingctx, x, r0, r1, C, k, ts, tq):
    """Channels-innermost 16-bit rows ``[r0, r1)`` of ``C`` values: ``ts[c] = sum_r(x[r, c] - k[c])`` and
    ``tq[c] = sum_r((x[r, c] - k[c])**2)`` in float32, 16 channels at a time down the rows.

    The accumulators stay in registers over the rows; the scalar loops (lanes across channels, one
    row after the other) loaded and stored ``ts`` and ``tq`` for every value and ran compute-bound
    (bf16 64x256x14x14 channels_last: 1.5x a copy, about torch's own ``sum``).
    """
    if not (isinstance(x, types.Array) and x.dtype in (types.uint16, types.int16)):
        return None
    if not all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (k, ts, tq)):
        return None

    def codegen(context, builder, signature, args):
        xt, _, _, _, kt, tst, tqt = signature.args
        xa, r0_, r1_, C_, ka, tsa, tqa = args
        zero = ir.Constant(_vt(_F32), [0.0] * _W)
        w = ir.Constant(C_.type, _W)
        with cgutils.for_range_slice(builder, ir.Constant(C_.type, 0), C_, w) as (c0, _):
            mask = _lane_mask(builder, builder.sub(C_, c0))
            kv = _load16(context, builder, kt, ka, c0, mask)
            s1 = cgutils.alloca_once_value(builder, zero)
            s2 = cgutils.alloca_once_value(builder, zero)
            with cgutils.for_range_slice(builder, r0_, r1_, ir.Constant(C_.type, 1)) as (r, _):
                i = builder.add(builder.mul(r, C_), c0)
                d = builder.select(mask, builder.fsub(_load16(context, builder, xt, xa, i, mask), kv), zero)
                builder.store(builder.fadd(builder.load(s1), d), s1)
                builder.store(_fma16(builder, d, d, builder.load(s2)), s2)
            for aty, ary, acc in ((tst, tsa, s1), (tqt, tqa, s2)):
                ptr = _lanes_ptr(context, builder, aty, ary, c0, _F32)
                builder.call(_masked(builder, "store", _vt(_F32)), [builder.load(acc), ptr, ir.Constant(_I32, 4), mask])
        return context.get_dummy_value()

    return types.void(x, r0, r1, C, k, ts, tq), codegen


def column_sums(x, r0, r1, C, k, ts, tq):
    """:func:`_column_sums16` where it applies (16-bit data on the SIMD path); callers keep their own
    loops for everything else (this version does nothing: it exists so that their dead branch types)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(column_sums, inline="always")
def _column_sums_impl(x, r0, r1, C, k, ts, tq):
    if _simd16(x):
        return lambda x, r0, r1, C, k, ts, tq: _column_sums16(x, r0, r1, C, k, ts, tq)
    return lambda x, r0, r1, C, k, ts, tq: None


def _masked_tail(builder, count, full, lanes16):
    # the last count - full (< 32) values: up to two 16-lane steps, each masked to what is left
    for half in (0, 1):
        j = builder.add(full, ir.Constant(count.type, half * _W))
        left = builder.sub(count, j)
        with builder.if_then(builder.icmp_signed(">", left, ir.Constant(count.type, 0))):
            lanes16(j, half, _lane_mask(builder, left))


def _lane_totals(builder, accs):
    # [acc0 + acc2, acc1 + acc3] summed over their lanes in float64
    vd = ir.VectorType(ir.DoubleType(), _W)
    red = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.DoubleType(), [ir.DoubleType(), vd]), "llvm.vector.reduce.fadd.v16f64"
    )
    out = []
    for s in (0, 1):
        both = builder.fadd(builder.fpext(builder.load(accs[s]), vd), builder.fpext(builder.load(accs[s + 2]), vd))
        # reassoc: a tree of adds, not 16 in a row (0.21 -> 0.17 cycles per bf16 value, stats in cache)
        out.append(builder.call(red, [ir.Constant(ir.DoubleType(), 0.0), both], fastmath=("reassoc",)))
    return out


def dot_block(gb, xb, m):
    """``(sum(gb), sum(gb * (xb - m)))`` of a block of ``RBLOCK`` (16-bit data: ``SBLOCK16``) values in the
    compute dtype, as float64."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@njit(**_JIT)
def _dot_block_loop(gb, xb, m):
    t0 = to_acc(gb, 0.0)
    t1 = t0
    for i in range(gb.shape[0]):
        g = load(gb, i)
        t0 += g
        t1 += g * (load(xb, i) - m)
    return float(t0), float(t1)


@overload(dot_block, inline="always", jit_options={"fastmath": _FAST})
def _dot_block_impl(gb, xb, m):
    if not (_simd16(gb) and m == types.float32):
        return lambda gb, xb, m: _dot_block_loop(gb, xb, m)

    def simd(gb, xb, m):
        return _dot_sums16(gb, xb, gb.shape[0], m)

    return simd


def simd16(a):
    """Whether array ``a`` takes the 16-wide SIMD code (a compile-time constant in jitted code). Callers
    keep their own scalar loops for everything else: the float32/float64 loops stay exactly as they were
    (moved into the helpers, 7x7 rows ran 1.8x slower)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(simd16, inline="always")
def _simd16_flag_impl(a):
    v = _simd16(a)
    return lambda a: v


def nsc_tile(xs):
    """:data:`NSC_TILE` for 16-bit data on the SIMD path, else 1 (one loop per row)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(nsc_tile)
def _nsc_tile_impl(xs):
    n = NSC_TILE if _simd16(xs) else 1
    return lambda xs: n


# --- shared math --------------------------------------------------------------------------------------


@njit(**_JIT)
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan, Golub, LeVeque (1979): (count, mean, M2) of the union of two disjoint sets."""
    n = n_a + n_b
    if n == 0.0:
        return 0.0, 0.0, 0.0
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@njit(**_JIT)
def _seg_stats(xs, n, cnt, mu, m2):
    # Merge the n contiguous values of xs into (cnt, mu, m2), reading each value once.
    # Shifted data: with a shift K near the data's mean, sum(x - K) and sum((x - K)**2) are
    # small, well-conditioned sums. They run in the data's compute dtype (float32 lanes vectorize
    # 8 wide) over blocks of SBLOCK values, each block summed into float64; then mean = K + S1/n
    # and M2 = S2 - S1**2/n, merged with Chan's formula. K is the mean so far or, for the first
    # segment, the mean of its first block (one more read of values still in L1): a single value
    # as K could be an outlier, and the float32 sums would then cancel badly.
    if n == 0:
        return cnt, mu, m2
    sb = SBLOCK16 if simd16(xs) else SBLOCK
    if cnt > 0.0:
        k = to_acc(xs, mu)
    else:
        n0 = min(n, sb)
        k = to_acc(xs, 0.0)
        for i in range(n0):
            k += load(xs, i)
        k = to_acc(xs, k / n0)
    if not np.isfinite(k):  # an inf or NaN shift would turn finite values into NaN
        k = to_acc(xs, 0.0)
    s1 = 0.0
    s2 = 0.0
    for b0 in range(0, n, sb):
        # a sub-slice indexed from 0: numba can then prove the index is non-negative and drops the
        # per-element wraparound check; `for i in range(b0, b1)` ran 2.2x slower (not memory-bound)
        blk = xs[b0 : min(b0 + sb, n)]
        if simd16(xs):
            ts, tq = block_sums(blk, k)
            s1 += ts
            s2 += tq
            continue
        ts = to_acc(xs, 0.0)
        tq = ts
        for i in range(blk.shape[0]):
            d = load(blk, i) - k
            ts += d
            tq += d * d
        s1 += ts
        s2 += tq
    nb = float(n)
    m2b = s2 - s1 * (s1 / nb)
    if m2b < 0.0:  # rounding; written so that NaN passes through
        m2b = 0.0
    return chan_merge(cnt, mu, m2, nb, float(k) + s1 / nb, m2b)


@njit(**_JIT)
def _ncs_chunk_stats(x, c, C, S, j0, j1):
    # (count, mean, M2) in float64 of channel c over channel indices [j0, j1), row segment by row segment.
    cnt = 0.0
    mu = 0.0
    m2 = 0.0
    for n in range(j0 // S, (j1 - 1) // S + 1):
        base = (n * C + c) * S
        lo = max(j0 - n * S, 0)
        hi = min(j1 - n * S, S)
        cnt, mu, m2 = _seg_stats(x[base + lo : base + hi], hi - lo, cnt, mu, m2)
    return cnt, mu, m2


@njit(**_JIT)
def _ncs_chunk_affine(u, x, out, c, C, S, j0, j1, has_u, a, m, k, sh):
    # out = a*u + k*(x - m) + sh over channel c's indices [j0, j1) (the u term only when has_u).
    for n in range(j0 // S, (j1 - 1) // S + 1):
        base = (n * C + c) * S
        lo = max(j0 - n * S, 0)
        hi = min(j1 - n * S, S)
        xs = x[base + lo : base + hi]
        os = out[base + lo : base + hi]
        if simd16(out):
            affine_span(u[base + lo : base + hi], xs, os, hi - lo, has_u, a, m, k, sh)
        elif has_u:
            us = u[base + lo : base + hi]
            for i in range(hi - lo):
                store(os, i, a * load(us, i) + k * (load(xs, i) - m) + sh)
        else:
            for i in range(hi - lo):
                store(os, i, (load(xs, i) - m) * k + sh)


@njit(**_JIT)
def _var_scale(cnt, m2, w, eps):
    # biased variance and scale = w / sqrt(var + eps) of a channel, in float64. A scalar helper: the
    # stores stay in the caller's loop over c, where numba knows c >= 0. A helper that took c and
    # the arrays (the form this had) kept a negative-index check on each store, and
    # finish_stats ran 5x slower (about 100 ns per channel: 14 us on 128 channels, now 2-3).
    v = m2 / cnt
    return v, w / np.sqrt(v + eps)


@njit(**_JIT)
def _part(total, parts, p):
    # [lo, hi) of part p when [0, total) is cut into `parts` nearly equal pieces.
    return (total * p) // parts, (total * (p + 1)) // parts


# --- channel-major (N, C, S) kernels ------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def ncs_train(
    x, y, N, C, S, P, fuse, weight, bias, eps, mean_out, var_out, nmean, scale, shift, part_n, part_mu, part_m2
):
    """Training forward on ``(N, C, S)`` memory; one task per (channel, part).

    ``fuse`` (needs ``P == 1``): each task owns a whole channel: it computes its statistics, then
    normalizes it, ``y = (x - mean) * scale + shift``, while its data is still in cache, and
    writes ``mean_out``/``var_out`` and ``nmean``/``scale``/``shift`` (normalization dtype). Otherwise (e.g.
    ``P > 1``, few channels) each task only writes the (count, mean, M2) of its part to
    ``part_*[p, c]``; the caller merges them (:func:`finish_stats`) and normalizes with
    :func:`ncs_affine`.
    """
    M = N * S
    for t in prange(C * P):
        c = t // P
        p = t % P
        j0, j1 = _part(M, P, p)
        cnt, mu, m2 = _ncs_chunk_stats(x, c, C, S, j0, j1)
        if fuse:
            # mean and biased var go out in the statistics dtype; the normalization gets the float64
            # mean and scale in the normalization dtype (float64, so each float32/float64 output is
            # rounded once; float32 for 16-bit data)
            v, sc = _var_scale(cnt, m2, float(weight[c]), eps)
            mean_out[c] = mu
            var_out[c] = v
            nmean[c] = mu
            scale[c] = sc
            shift[c] = bias[c]
            _ncs_chunk_affine(x, x, y, c, C, S, 0, M, False, scale[c], nmean[c], scale[c], shift[c])
        else:
            part_n[p, c] = cnt
            part_mu[p, c] = mu
            part_m2[p, c] = m2


@njit(**_JIT)
def finish_stats(part_n, part_mu, part_m2, weight, bias, eps, mean_out, var_out, nmean, scale, shift):
    """Merge per-part (count, mean, M2) rows ``part_*[p, c]`` into mean, var, scale, shift.

    All parts at once (the parallel form of Chan's formula): ``mean = mu_0 + sum(n_p (mu_p -
    mu_0)) / n`` (deviations from part 0's mean keep offset data exact), then ``M2 = sum(M2_p +
    n_p (mu_p - mean)**2)``. Loops run over channels innermost (they vectorize) and make one
    division per channel instead of three per part. ``mean_out``/``var_out`` are in the statistics
    dtype; ``nmean``/``scale``/``shift`` (what the normalization uses) in the normalization dtype.
    """
    P, C = part_mu.shape
    cnt = np.zeros(C)
    dev = np.zeros(C)
    for p in range(P):
        for c in range(C):
            cnt[c] += part_n[p, c]
            dev[c] += part_n[p, c] * (part_mu[p, c] - part_mu[0, c])
    mu = np.empty(C)
    for c in range(C):
        mu[c] = part_mu[0, c] + (dev[c] / cnt[c] if cnt[c] > 0.0 else 0.0)
    m2 = np.zeros(C)
    for p in range(P):
        for c in range(C):
            d = part_mu[p, c] - mu[c]
            m2[c] += part_m2[p, c] + part_n[p, c] * d * d
    for c in range(C):  # the stores of ncs_train's fused channel
        v, sc = _var_scale(cnt[c], m2[c], float(weight[c]), eps)
        mean_out[c] = mu[c]
        var_out[c] = v
        nmean[c] = mu[c]
        scale[c] = sc
        shift[c] = bias[c]


@njit(parallel=True, **_JIT)
def ncs_row_stats(x, N, C, S, T, part_n, part_mu, part_m2):
    """Per-part statistics of ``(N, C, S)`` memory read in memory order (for short rows ``S``).

    ``T`` tasks each stream a range of rows ``r = n*C + c``, reading each value once. Per
    channel a task shifts by ``K`` (the first finite value it meets in that channel) and adds
    ``sum(x - K)`` and ``sum((x - K)**2)`` over each row into float64 totals: no division per
    row, and the shifted sums stay well-conditioned unless the data spreads over many orders of
    magnitude more than its standard deviation. At the end ``mean = K + S1/n`` and
    ``M2 = S2 - S1**2/n`` go to ``part_*[t, c]``; the caller merges the parts
    (:func:`finish_stats`) and normalizes with :func:`ncs_affine`.
    """
    R = N * C
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        k = np.zeros(C)
        s1 = np.zeros(C)
        s2 = np.zeros(C)
        cnt = np.zeros(C)
        c = r0 % C  # counted along the rows, not divided out of r per row
        for r in range(r0, r1):
            xs = x[r * S : (r + 1) * S]
            if cnt[c] == 0.0:
                k0 = float(load(xs, 0))
                k[c] = k0 if np.isfinite(k0) else 0.0
            kc = k[c]
            a = 0.0
            q = 0.0
            for i in range(S):
                d = load(xs, i) - kc
                a += d
                q += d * d
            s1[c] += a
            s2[c] += q
            cnt[c] += S
            c += 1
            if c == C:
                c = 0
        for ch in range(C):
            n = cnt[ch]
            part_n[t, ch] = n
            if n == 0.0:
                part_mu[t, ch] = 0.0
                part_m2[t, ch] = 0.0
                continue
            part_mu[t, ch] = k[ch] + s1[ch] / n
            m2 = s2[ch] - s1[ch] * (s1[ch] / n)
            part_m2[t, ch] = m2 if not m2 < 0.0 else 0.0


@njit(parallel=True, **_JIT)
def ncs_affine(u, x, out, N, C, S, T, Q, has_u, a, mean, k, shift):
    """``out = a[c]*u + k[c]*(x - mean[c]) + shift[c]`` on ``(N, C, S)`` memory, one pass.

    Eval forward is ``has_u=False`` (``k`` = scale); the backward input pass is ``has_u=True``
    with ``u = dy``. Tasks walk memory in order: with ``Q == 1`` each of the ``T`` tasks streams
    a range of rows ``r = n*C + c`` (the channel counted along, not divided out per row); with
    ``Q > 1`` (too few rows to fill the threads) each task is one of the ``Q`` segments of a row.
    One task per row, as this kernel had, cost 2.6 ms against 1.05 ms (a copy: 1.04 ms) on
    256x512x7x7: per-task scheduling and divisions on rows of 49 values.
    """
    if Q > 1:
        for t in prange(N * C * Q):
            r = t // Q
            s0, s1 = _part(S, Q, t % Q)
            _affine_run(u, x, out, r * S + s0, r * S + s1, has_u, a[r % C], mean[r % C], k[r % C], shift[r % C])
        return
    R = N * C
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        c = r0 % C
        for r in range(r0, r1):
            _affine_run(u, x, out, r * S, (r + 1) * S, has_u, a[c], mean[c], k[c], shift[c])
            c += 1
            if c == C:
                c = 0


@njit(inline="always", **_JIT)
def _affine_run(u, x, out, i0, i1, has_u, ac, m, kc, sh):
    # out[i] = ac*u[i] + kc*(x[i] - m) + sh on [i0, i1), over slices indexed from 0
    xs = x[i0:i1]
    os = out[i0:i1]
    if simd16(out):
        affine_span(u[i0:i1], xs, os, i1 - i0, has_u, ac, m, kc, sh)
    elif has_u:
        us = u[i0:i1]
        for i in range(i1 - i0):
            store(os, i, ac * load(us, i) + kc * (load(xs, i) - m) + sh)
    else:
        for i in range(i1 - i0):
            store(os, i, (load(xs, i) - m) * kc + sh)


@njit(parallel=True, **_JIT)
def ncs_affine_short(u, x, out, N, C, S, Q, has_u, a, mean, k, shift, tab):
    """:func:`ncs_affine` for very short rows (``S <= SHORT_ROW_S`` of the launcher, e.g. 4x4):
    one loop over a sample's ``C*S`` values.

    A row of 16 values is less than one vector loop iteration; here the per-channel constants are
    first repeated over one sample (``tab``: 4 rows of ``C*S`` values of their dtype, built once
    per call, small enough to stay in cache), so each of the ``N*Q`` tasks (sample ``n``, segment
    ``q`` of its ``C*S`` values) is one long loop that vectorizes. From about 25 values per row
    (5x5) :func:`ncs_affine`'s ranges of rows are faster.
    """
    CS = C * S
    for c in range(C):
        for i in range(S):
            j = c * S + i
            tab[0, j] = a[c]
            tab[1, j] = mean[c]
            tab[2, j] = k[c]
            tab[3, j] = shift[c]
    ta, tm, tk, tsh = tab[0], tab[1], tab[2], tab[3]
    for t in prange(N * Q):
        n = t // Q
        j0, j1 = _part(CS, Q, t % Q)
        xs = x[n * CS + j0 : n * CS + j1]
        os = out[n * CS + j0 : n * CS + j1]
        ma, mm, mk, msh = ta[j0:j1], tm[j0:j1], tk[j0:j1], tsh[j0:j1]
        if simd16(out):
            affine_lanes(u[n * CS + j0 : n * CS + j1], xs, os, j1 - j0, has_u, ma, mm, mk, msh)
        elif has_u:
            us = u[n * CS + j0 : n * CS + j1]
            for i in range(j1 - j0):
                store(os, i, ma[i] * load(us, i) + mk[i] * (load(xs, i) - mm[i]) + msh[i])
        else:
            for i in range(j1 - j0):
                store(os, i, (load(xs, i) - mm[i]) * mk[i] + msh[i])


@njit(parallel=True, **_JIT)
def ncs_reduce(dy, x, N, C, S, T, mean, sum_dy, sum_dy_xmu, write, dx, scale):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per channel on ``(N, C, S)`` memory, one pass.

    With ``write`` it also stores ``dx = scale[c] * dy`` in the same read (eval-mode backward).

    ``T`` tasks each stream a range of rows ``r = n*C + c`` in memory order (prefetch-friendly
    even when ``S`` is small), the channel counted along (no division per row), each row summed
    like every reduction here (:func:`_dot_sums`: float32 lanes in blocks of ``RBLOCK`` values,
    float64 across blocks) into the task's per-channel float64 accumulators, summed at the end.
    Measured on 256x512x7x7 (interleaved): 1.54 ms against 2.37 ms with float64 row sums and a
    modulo per row; two ``Tensor.sum`` calls over ``dy`` and ``x`` take 1.1 ms.
    """
    R = N * C
    acc0 = np.zeros((T, C))
    acc1 = np.zeros((T, C))
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        c = r0 % C
        a0 = acc0[t]
        a1 = acc1[t]
        for r in range(r0, r1):
            gs = dy[r * S : (r + 1) * S]
            xs = x[r * S : (r + 1) * S]
            if write:
                s0, s1 = _dot_sums(gs, xs, mean[c], S, dx[r * S : (r + 1) * S], scale[c])
            else:
                s0, s1 = _dot_sums(gs, xs, mean[c], S)
            a0[c] += s0
            a1[c] += s1
            c += 1
            if c == C:
                c = 0
    _sum_tasks(acc0, acc1, sum_dy, sum_dy_xmu)


@njit(**_JIT)
def _sum_tasks(acc0, acc1, sum_dy, sum_dy_xmu):
    # The reductions' per-task rows acc[t, c], added up per channel (serial, after the prange).
    T, C = acc0.shape
    for c in range(C):
        tot0 = 0.0
        tot1 = 0.0
        for t in range(T):
            tot0 += acc0[t, c]
            tot1 += acc1[t, c]
        sum_dy[c] = tot0
        sum_dy_xmu[c] = tot1


@njit(**_JIT)
def _dot_sums(gs, xs, m, n, ds=None, sc=0.0):
    # (sum(g), sum(g * (x - m))) over n values: float32 lanes within blocks of RBLOCK values (they
    # vectorize 8 wide; a block's rounding error stays ~1e-7 relative), blocks summed in float64.
    # With ``ds`` also ds = sc * g in the same read (the eval-mode backward's dx); numba decides
    # ``ds is None`` when it compiles, so the plain sums carry no store.
    s0 = 0.0
    s1 = 0.0
    rb = SBLOCK16 if simd16(gs) else RBLOCK
    for b0 in range(0, n, rb):
        b1 = min(b0 + rb, n)
        gb = gs[b0:b1]  # sub-slices indexed from 0 (see _seg_stats)
        xb = xs[b0:b1]
        if ds is None and simd16(gs):
            t0, t1 = dot_block(gb, xb, m)
            s0 += t0
            s1 += t1
            continue
        if ds is not None:
            db = ds[b0:b1]
        t0 = to_acc(gs, 0.0)
        t1 = t0
        for i in range(gb.shape[0]):
            g = load(gb, i)
            t0 += g
            t1 += g * (load(xb, i) - m)
            if ds is not None:
                store(db, i, sc * g)
        s0 += t0
        s1 += t1
    return s0, s1


@njit(**_JIT)
def backward_coeffs(sum_dy, sum_dy_xmu, invstd, weight, M, sum_dy_xhat, a, k, cc):
    """Per-channel coefficients of the training backward from the two reductions.

    ``sum_dy_xhat = sum_dy_xmu * invstd``; ``dx = a*dy + k*(x - mean) + cc`` with ``a = invstd*w``,
    ``k = -a*invstd*sum_dy_xhat/M`` and ``cc = -a*sum_dy/M`` (symbols of :mod:`bnkit.autograd`),
    each rounded to the statistics dtype of the output arrays.
    """
    for c in range(sum_dy.shape[0]):
        _coeffs_channel(c, sum_dy[c], sum_dy_xmu[c], invstd, weight, M, sum_dy, sum_dy_xhat, a, k, cc)


@njit(**_JIT)
def _coeffs_channel(c, s0, s1, invstd, weight, M, sum_dy, sum_dy_xhat, a, k, cc):
    sum_dy[c] = s0
    sum_dy_xhat[c] = s1 * invstd[c]
    a[c] = invstd[c] * weight[c]
    k[c] = -a[c] * invstd[c] * (sum_dy_xhat[c] / M)
    cc[c] = -a[c] * (sum_dy[c] / M)


@njit(parallel=True, **_JIT)
def ncs_backward_train(dy, x, dx, N, C, S, mean, invstd, weight, sum_dy, sum_dy_xhat, a, k, cc):
    """Fused training backward on ``(N, C, S)`` memory, one task per channel.

    Each task reduces ``sum(dy)`` and ``sum(dy * (x - mean))`` over its channel, forms the
    coefficients (:func:`backward_coeffs`), then writes ``dx = a*dy + k*(x - mean) + cc`` while
    the channel's ``dy`` and ``x`` are still in cache: memory is read about once.
    """
    M = float(N * S)
    for c in prange(C):
        m = mean[c]
        s0 = 0.0
        s1 = 0.0
        for n in range(N):
            base = (n * C + c) * S
            r0, r1 = _dot_sums(dy[base : base + S], x[base : base + S], m, S)
            s0 += r0
            s1 += r1
        _coeffs_channel(c, s0, s1, invstd, weight, M, sum_dy, sum_dy_xhat, a, k, cc)
        ac = a[c]
        kc = k[c]
        cv = cc[c]
        for n in range(N):
            base = (n * C + c) * S
            gs = dy[base : base + S]
            xs = x[base : base + S]
            ds = dx[base : base + S]
            if simd16(dx):
                affine_span(gs, xs, ds, S, True, ac, m, kc, cv)
                continue
            for i in range(S):
                store(ds, i, ac * load(gs, i) + kc * (load(xs, i) - m) + cv)


# --- channel-minor (R, C) kernels ---------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def nsc_stats(x, R, C, T, part_n, part_mu, part_m2):
    """Per-part statistics of ``(R, C)`` memory (channels innermost): ``T`` row ranges in parallel.

    Each part reads its rows once, ``NSC_SBLOCK`` rows at a time: per channel, the block is shifted
    by ``K``, the part's mean so far (for its first block, that block's own mean, from one more
    read of rows still in cache), and ``sum(x - K)``, ``sum((x - K)**2)`` run in the compute dtype across
    channels (they vectorize); the block's (mean, M2) is merged in float64 into the part's
    (count, mean, M2), ``part_*[t, c]`` (Chan). The caller merges the parts
    (:func:`finish_stats`) and normalizes with :func:`nsc_affine`.
    """
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        zero = to_acc(x, 0.0)
        k = np.full(C, zero)
        ts = np.full(C, zero)
        tq = np.full(C, zero)
        mu = np.zeros(C)
        m2 = np.zeros(C)
        cnt = 0.0
        for b0 in range(r0, r1, NSC_SBLOCK):
            b1 = min(b0 + NSC_SBLOCK, r1)
            if cnt == 0.0:  # the first block's own mean (one more read, in cache): never one value
                for c in range(C):
                    k[c] = zero
                for r in range(b0, b1):
                    xr = x[r * C : (r + 1) * C]
                    for c in range(C):
                        k[c] += load(xr, c)
                for c in range(C):
                    k[c] = k[c] / (b1 - b0)
            else:  # the mean so far
                for c in range(C):
                    k[c] = mu[c]
            for c in range(C):
                if not np.isfinite(k[c]):
                    k[c] = zero
                ts[c] = 0.0
                tq[c] = 0.0
            if simd16(x):
                column_sums(x, b0, b1, C, k, ts, tq)
            else:
                for r in range(b0, b1):
                    xr = x[r * C : (r + 1) * C]
                    for c in range(C):
                        d = load(xr, c) - k[c]
                        ts[c] += d
                        tq[c] += d * d
            nb = float(b1 - b0)
            inv_nb = 1.0 / nb
            n = cnt + nb
            w_b = nb / n
            w_ab = cnt * nb / n
            for c in range(C):
                s1 = float(ts[c])
                m2b = float(tq[c]) - s1 * s1 * inv_nb
                if m2b < 0.0:
                    m2b = 0.0
                delta = float(k[c]) + s1 * inv_nb - mu[c]
                mu[c] += delta * w_b
                m2[c] += m2b + delta * delta * w_ab
            cnt = n
        for c in range(C):
            part_n[t, c] = cnt
            part_mu[t, c] = mu[c]
            part_m2[t, c] = m2[c]


@njit(parallel=True, **_JIT)
def nsc_affine(u, x, out, R, C, T, has_u, a, mean, k, shift):
    """``out = a[c]*u + k[c]*(x - mean[c]) + shift[c]`` on ``(R, C)`` memory, one pass.

    16-bit data on the SIMD path: the coefficients are first repeated over ``q`` rows (``q*C`` about
    ``NSC_TILE`` values), so each task runs one long loop per ``q`` rows. One loop per row cost about
    10 ns per row beyond its values there: bf16 32x64x56x56 channels_last (100352 rows of 64) took
    1.7x as long. float32/float64 data (float64 coefficients, twice the bytes, compute-heavier lanes)
    ran 3-10% slower with tables, and keeps one loop per row.
    """
    q = max(1, nsc_tile(x) // C)
    if q == 1:
        for t in prange(T):
            r0, r1 = _part(R, T, t)
            for r in range(r0, r1):
                xr = x[r * C : (r + 1) * C]
                orow = out[r * C : (r + 1) * C]
                if simd16(out):
                    affine_lanes(u[r * C : (r + 1) * C], xr, orow, C, has_u, a, mean, k, shift)
                elif has_u:
                    ur = u[r * C : (r + 1) * C]
                    for c in range(C):
                        store(orow, c, a[c] * load(ur, c) + k[c] * (load(xr, c) - mean[c]) + shift[c])
                else:
                    for c in range(C):
                        store(orow, c, (load(xr, c) - mean[c]) * k[c] + shift[c])
        return
    tab = np.empty((4, q * C), a.dtype)
    for j in range(q):
        for c in range(C):
            tab[0, j * C + c] = a[c]
            tab[1, j * C + c] = mean[c]
            tab[2, j * C + c] = k[c]
            tab[3, j * C + c] = shift[c]
    ta, tm, tk, tsh = tab[0], tab[1], tab[2], tab[3]
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        for r in range(r0, r1, q):
            i0 = r * C
            m = (min(r + q, r1) - r) * C
            affine_lanes(u[i0 : i0 + m], x[i0 : i0 + m], out[i0 : i0 + m], m, has_u, ta[:m], tm[:m], tk[:m], tsh[:m])


@njit(parallel=True, **_JIT)
def nsc_reduce(dy, x, R, C, T, mean, sum_dy, sum_dy_xmu, write, dx, scale):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per channel on ``(R, C)`` memory, one pass.

    With ``write`` it also stores ``dx = scale[c] * dy`` in the same read (eval-mode backward).
    Each task sums blocks of ``NSC_SBLOCK`` rows in the data's compute dtype, vectorized across
    channels, and adds the block sums into float64 (the numerics of every reduction here):
    float64 accumulators across all rows ran at 1.2-2.2x the time of two ``Tensor.sum`` calls
    (32x64x56x56 channels_last 2.23 ms, now 1.29 ms; two sums 1.16 ms).
    """
    acc0 = np.zeros((T, C))
    acc1 = np.zeros((T, C))
    for t in prange(T):
        r0, r1 = _part(R, T, t)
        zero = to_acc(x, 0.0)
        m = np.empty(C, mean.dtype)
        for c in range(C):
            m[c] = mean[c]
        t0 = np.full(C, zero)
        t1 = np.full(C, zero)
        a0 = acc0[t]
        a1 = acc1[t]
        for b0 in range(r0, r1, NSC_SBLOCK):
            b1 = min(b0 + NSC_SBLOCK, r1)
            for c in range(C):
                t0[c] = zero
                t1[c] = zero
            for r in range(b0, b1):
                gr = dy[r * C : (r + 1) * C]
                xr = x[r * C : (r + 1) * C]
                if write:
                    dr = dx[r * C : (r + 1) * C]
                    for c in range(C):
                        g = load(gr, c)
                        t0[c] += g
                        t1[c] += g * (load(xr, c) - m[c])
                        store(dr, c, scale[c] * g)
                else:
                    for c in range(C):
                        g = load(gr, c)
                        t0[c] += g
                        t1[c] += g * (load(xr, c) - m[c])
            for c in range(C):
                a0[c] += t0[c]
                a1[c] += t1[c]
    _sum_tasks(acc0, acc1, sum_dy, sum_dy_xmu)


def load_backend():
    """The ``cpu`` backend (called by :func:`bnkit.kernels.get_backend`).

    Compiles (or loads from numba's cache) one small kernel so that a broken numba
    install fails here, where the dispatcher turns it into one warning and the reference.
    """
    import numba
    import torch

    from bnkit.kernels.cpu_launch import CpuBackend, _numba_state

    # Starting numba's OpenMP threading layer resets the process's OpenMP thread count,
    # which torch reads: start it here, once, and give torch its setting back.
    torch_threads = torch.get_num_threads()
    numba.set_num_threads(1)
    probe = np.zeros(2, np.float32)
    nsc_affine(probe, probe, probe.copy(), 1, 2, 1, False, probe, probe, probe, probe)
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    # The launchers remember the count they last set: tell them it is 1 now, or a launcher that
    # ran before this (a direct CpuBackend user) would go on with one thread.
    _numba_state.nt = 1
    return CpuBackend()


# --- eval-mode coefficients (appended for the per-call overhead on small inputs) ---------------------


@njit(cache=True, error_model="numpy")
def eval_coeffs(running_var, weight, bias, eps, one, scale, shift):
    """``scale = (1 / sqrt(running_var + eps)) * weight`` and ``shift = bias`` per channel, in one call.

    The IEEE operations of autograd's torch ops (``rsqrt(running_var + eps) * weight``: torch's CPU
    rsqrt is a correctly rounded ``1 / sqrt``), in the same dtype and order, so the results are
    equal bit for bit. Hence no fastmath (``arcp`` may turn ``1 / sqrt`` into an approximate
    reciprocal square root) and numpy's error model (``1 / 0`` is ``inf``, not an exception).
    ``eps`` and ``one`` come as scalars of the statistics dtype so the arithmetic stays in it.
    """
    for c in range(scale.shape[0]):
        scale[c] = (one / np.sqrt(running_var[c] + eps)) * weight[c]
        shift[c] = bias[c]
