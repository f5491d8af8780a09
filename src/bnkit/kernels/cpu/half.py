r"""16-bit data in the cpu kernels: the scalar codecs and, on AVX-512, the 16-wide vector code.

:func:`load` widens an element to the compute dtype (float64 for float64 arrays, float32 otherwise:
bfloat16 by a shift, float16 exactly) and :func:`store` rounds back to nearest-even exactly as torch
does (uint16 arrays hold bfloat16 bits, int16 arrays float16 bits; numba has neither type). They are
integer ops and bitcasts, so fastmath cannot change them.

Where the CPU has AVX-512 (``SIMD_BF16``/``SIMD_F16``) the normalize-type loops of 16-bit data
(:func:`affine`) and the blocks of their sums (:func:`block_sums`,
:func:`dot_block`, :func:`column_sums`) run 16 values at a time in explicit vector code: LLVM IR
written here through numba intrinsics, rounding with the CPU's conversion instructions to the scalar
codec's bits. :func:`block_sums` and :func:`dot_block` serve every dtype (plain loops elsewhere), and
:func:`block_sums` runs float32 data's blocks in the same vector code on these CPUs (faster than LLVM's
own float32 lanes there); every normalize loop of :mod:`bnkit.kernels.cpu.passes` that 16-bit data can
take is an :func:`affine` call (the 16-wide code where :func:`simd16` holds, a plain loop otherwise);
:func:`column_sums` also takes float32 data on these CPUs and says whether it ran (else the caller's loop
runs).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from bnkit.kernels.compiling import announce_compiles
from bnkit.kernels.cpu.cache import ensure_fresh

# Every kernel module imports this one first: drop cached kernels whose sources changed before any
# dispatcher of the package can load them (numba's cache watches only a kernel's own file), and say
# when a call has to compile.
ensure_fresh()
announce_compiles()

__all__ = [
    "NSC_TILE",
    "SIMD_BF16",
    "SIMD_F16",
    "affine",
    "block_sums",
    "column_sums",
    "dot_block",
    "load",
    "has_row_lanes",
    "nsc_tile",
    "row_lanes",
    "row_lanes_type",
    "simd16",
    "simd16_type",
    "store",
    "to_acc",
]

# reassoc lets LLVM vectorize the float64 reductions; no nnan/ninf: NaN and inf propagate.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_JIT = {"cache": True, "fastmath": _FAST}
# Values per tile of the channels-innermost normalize of 16-bit data on the SIMD path (rows of C values
# repeated up to this many; shorter tiles cost more per value, longer ones gain nothing).
NSC_TILE = 512


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
# vector instructions per 16 values, and the normalize pass of bf16 data ran compute-bound, at several
# times a copy's time. The intrinsics below write whole vectors in LLVM IR:
# bf16 is rounded by VCVTNEPS2BF16 and float16 by VCVTPS2PH (both round to nearest even, as torch
# does). VCVTNEPS2BF16 flushes subnormals, and both give NaNs other bits than torch's codec, so a
# vector holding a NaN or a float32 subnormal (one VFPCLASSPS test) is rounded again by the integer
# codec: every value gets the bits of the scalar codec. The SIMD_*
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
# data dtypes the 16-wide loads take: bfloat16 bits, float16 bits, float32
_LANE_DTYPES = (types.uint16, types.int16, types.float32)
_I1, _I16, _I32, _F32 = ir.IntType(1), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vt(t):
    return ir.VectorType(t, _W)


def simd16_type(a) -> bool:
    """Whether an array of numba type ``a`` takes the SIMD intrinsics on this CPU (16-bit data only): the
    test an ``@overload`` makes to compile only the code its data takes (:func:`simd16` inside jitted code)."""
    return (a.dtype == types.uint16 and SIMD_BF16) or (a.dtype == types.int16 and SIMD_F16)


def _simd_sums(a) -> bool:
    """Whether the block sums of data array ``a`` take the 16-wide intrinsics: 16-bit data on the SIMD
    path, and float32 data on the same CPUs (it needs only the features float16's code does)."""
    return simd16_type(a) or (a.dtype == types.float32 and SIMD_F16)


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


def _at(v, i):
    """``v[i]`` for a per-value coefficient array, ``v`` itself for a scalar coefficient."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(_at, inline="always")
def _at_impl(v, i):
    if isinstance(v, types.Array):
        return lambda v, i: v[i]
    return lambda v, i: v


def affine(us, xs, os, n, has_u, a, m, k, sh):
    """``os[i] = a*us[i] + k*(xs[i] - m) + sh`` for ``i < n`` (the ``us`` term only with ``has_u``).

    The coefficients are scalars, or arrays of one value per element (channels innermost, per-position
    tables: ``a[i]``, ...). 16-bit data on the SIMD path with float32 coefficients runs :func:`_affine16`;
    every other case the plain loop below, in the caller's fastmath flags (inlined), with the
    coefficients' precision.
    """
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(affine, inline="always", jit_options={"fastmath": _FAST})
def _affine_impl(us, xs, os, n, has_u, a, m, k, sh):
    lanes = isinstance(m, types.Array)
    coeff = m.dtype if lanes else m
    if simd16_type(os) and coeff == types.float32:

        def simd(us, xs, os, n, has_u, a, m, k, sh):
            if has_u:
                for i in range(0, n, _W):
                    _affine16(us, xs, os, i, n - i, a, m, k, sh, True, lanes)
            else:
                for i in range(0, n, _W):
                    _affine16(us, xs, os, i, n - i, a, m, k, sh, False, lanes)

        return simd

    def plain(us, xs, os, n, has_u, a, m, k, sh):
        if has_u:
            for i in range(n):
                store(os, i, _at(a, i) * load(us, i) + _at(k, i) * (load(xs, i) - _at(m, i)) + _at(sh, i))
        else:
            for i in range(n):
                store(os, i, (load(xs, i) - _at(m, i)) * _at(k, i) + _at(sh, i))

    return plain


def _paired_sums(builder, count, terms):
    """``(sum(t0), sum(p * q))`` in float64 over ``count`` values, 16 lanes at a time.

    ``terms(j, mask)`` returns the ``<16 x float>`` ``(t0, p, q)`` of values ``j .. j+15``; with a
    ``mask`` (only the lanes before ``count``) the others must add nothing (:func:`_zero_off`). Two
    pairs of accumulators, 32 partial float32 sums, each pair fed every other step so that the add
    latency hides; the last ``count % 32`` values are up to two masked steps; the lanes are summed in
    float64 at the end.
    """
    zero = ir.Constant(_vt(_F32), [0.0] * _W)
    accs = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]  # (t0, pq) for steps 0, 1 of 32

    def step(j, half, mask):
        t0, p, q = terms(j, mask)
        s0, s1 = accs[2 * half], accs[2 * half + 1]
        builder.store(builder.fadd(builder.load(s0), t0), s0)
        builder.store(_fma16(builder, p, q, builder.load(s1)), s1)

    two = ir.Constant(count.type, 2 * _W)
    full = builder.sub(count, builder.srem(count, two))
    with cgutils.for_range_slice(builder, ir.Constant(count.type, 0), full, two) as (i, _):
        for half in (0, 1):
            step(builder.add(i, ir.Constant(count.type, half * _W)), half, None)
    for half in (0, 1):
        j = builder.add(full, ir.Constant(count.type, half * _W))
        left = builder.sub(count, j)
        with builder.if_then(builder.icmp_signed(">", left, ir.Constant(count.type, 0))):
            step(j, half, _lane_mask(builder, left))
    vd = ir.VectorType(ir.DoubleType(), _W)
    red = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.DoubleType(), [ir.DoubleType(), vd]), "llvm.vector.reduce.fadd.v16f64"
    )
    out = []
    for s in (0, 1):
        both = builder.fadd(builder.fpext(builder.load(accs[s]), vd), builder.fpext(builder.load(accs[s + 2]), vd))
        # reassoc: a tree of adds, not 16 in a row (a shorter dependency chain)
        out.append(builder.call(red, [ir.Constant(ir.DoubleType(), 0.0), both], fastmath=("reassoc",)))
    return out


def _zero_off(builder, mask, v):
    # v with the lanes outside mask set to 0 (masked loads give 0 there, but x - k does not)
    return v if mask is None else builder.select(mask, v, ir.Constant(_vt(_F32), [0.0] * _W))


@intrinsic
def _shifted_sums16(typingctx, xs, n, k):
    """``(sum(xs[i] - k), sum((xs[i] - k)**2))`` over ``i < n``, 16-bit or float32 data, in float32 lanes
    (:func:`_paired_sums`: 32 partial sums, so a block of SBLOCK16 values adds SBLOCK16 / 32 in each).
    The vectorizer made 8-wide loops of this with a horizontal sum per block, about twice the time."""
    if not (isinstance(xs, types.Array) and xs.dtype in _LANE_DTYPES and k == types.float32):
        return None

    def codegen(context, builder, signature, args):
        ary, count, kv = args
        ks = _splat(builder, kv)

        def terms(j, mask):
            d = _zero_off(builder, mask, builder.fsub(_load16(context, builder, signature.args[0], ary, j, mask), ks))
            return d, d, d

        return context.make_tuple(builder, signature.return_type, _paired_sums(builder, count, terms))

    return types.UniTuple(types.float64, 2)(xs, n, k), codegen


@intrinsic
def _dot_sums16(typingctx, gs, xs, n, m):
    """``(sum(gs[i]), sum(gs[i] * (xs[i] - m)))`` over ``i < n``, 16-bit data, float32 lanes
    (:func:`_paired_sums`)."""
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
        ms = _splat(builder, mv)

        def terms(j, mask):
            g = _load16(context, builder, gty, g_ary, j, mask)  # 0 outside mask
            return g, g, _zero_off(builder, mask, builder.fsub(_load16(context, builder, xty, x_ary, j, mask), ms))

        return context.make_tuple(builder, signature.return_type, _paired_sums(builder, count, terms))

    return types.UniTuple(types.float64, 2)(gs, xs, n, m), codegen


def block_sums(blk, k):
    """``(sum(blk - k), sum((blk - k)**2))`` of one block of values, summed in the compute dtype
    (float32 for all but float64 data; blocks of ``SBLOCK``, or ``SBLOCK16`` on the SIMD path), as float64;
    16-bit and float32 data with a float32 ``k`` take :func:`_shifted_sums16` on AVX-512."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(block_sums, inline="always", jit_options={"fastmath": _FAST})
def _block_sums_impl(blk, k):
    if _simd_sums(blk) and k == types.float32:
        return lambda blk, k: _shifted_sums16(blk, blk.shape[0], k)

    def plain(blk, k):
        ts = to_acc(blk, 0.0)
        tq = ts
        for i in range(blk.shape[0]):
            d = load(blk, i) - k
            ts += d
            tq += d * d
        return float(ts), float(tq)

    return plain


def dot_block(gb, xb, m):
    """``(sum(gb), sum(gb * (xb - m)))`` of one block of values in the compute dtype, as float64 (blocks of
    ``RBLOCK``, or ``SBLOCK16`` on the SIMD path). float32 data keeps the plain loop: LLVM's float32 lanes
    are as fast as :func:`_dot_sums16`'s there."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(dot_block, inline="always", jit_options={"fastmath": _FAST})
def _dot_block_impl(gb, xb, m):
    if simd16_type(gb) and m == types.float32:
        return lambda gb, xb, m: _dot_sums16(gb, xb, gb.shape[0], m)

    def plain(gb, xb, m):
        t0 = to_acc(gb, 0.0)
        t1 = t0
        for i in range(gb.shape[0]):
            g = load(gb, i)
            t0 += g
            t1 += g * (load(xb, i) - m)
        return float(t0), float(t1)

    return plain


@intrinsic
def _column_sums16(typingctx, x, r0, r1, C, k, ts, tq):
    """Channels-innermost 16-bit or float32 rows ``[r0, r1)`` of ``C`` values: ``ts[c] = sum_r(x[r, c] -
    k[c])`` and ``tq[c] = sum_r((x[r, c] - k[c])**2)`` in float32, 16 channels at a time down the rows.

    The accumulators stay in registers over the rows; the scalar loops (lanes across channels, one
    row after the other) loaded and stored ``ts`` and ``tq`` for every value and ran compute-bound.
    float32 statistics take it too: faster than the scalar loops on channels_last inputs, never slower.
    """
    if not (isinstance(x, types.Array) and x.dtype in (types.uint16, types.int16, types.float32)):
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
    """:func:`_column_sums16` where it applies (16-bit data on the SIMD path, and float32 data on the same
    CPUs), returning ``True``; elsewhere it does nothing and returns ``False`` (a compile-time constant),
    and callers run their own loops."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(column_sums, inline="always")
def _column_sums_impl(x, r0, r1, C, k, ts, tq):
    if _simd_sums(x):

        def vector(x, r0, r1, C, k, ts, tq):
            _column_sums16(x, r0, r1, C, k, ts, tq)
            return True

        return vector
    return lambda x, r0, r1, C, k, ts, tq: False


@intrinsic
def _row_lanes16(typingctx, gs, xs, n, m, acc0, acc1, off):
    """``acc0[off:off+16] += gs`` and ``acc1[off:off+16] += gs * (xs - m)`` lane by lane over ``i < n``
    (16-bit or float32 data, float32 lanes; the last step masked): one short row's contribution to its
    channel's 16 lanes, with no horizontal sum (see :func:`row_lanes`)."""
    if not (
        isinstance(gs, types.Array)
        and isinstance(xs, types.Array)
        and gs.dtype == xs.dtype
        and xs.dtype in _LANE_DTYPES
        and m == types.float32
        and all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (acc0, acc1))
    ):
        return None

    def codegen(context, builder, signature, args):
        gty, xty, _, _, a0ty, a1ty, _ = signature.args
        ga, xa, count, mv, a0, a1, o = args
        ms = _splat(builder, mv)
        p0 = _lanes_ptr(context, builder, a0ty, a0, o, _F32)
        p1 = _lanes_ptr(context, builder, a1ty, a1, o, _F32)
        s0 = cgutils.alloca_once_value(builder, builder.load(p0, align=4))
        s1 = cgutils.alloca_once_value(builder, builder.load(p1, align=4))

        def step(j, mask):
            g = _load16(context, builder, gty, ga, j, mask)  # 0 outside mask
            d = _zero_off(builder, mask, builder.fsub(_load16(context, builder, xty, xa, j, mask), ms))
            builder.store(builder.fadd(builder.load(s0), g), s0)
            builder.store(_fma16(builder, g, d, builder.load(s1)), s1)

        w = ir.Constant(count.type, _W)
        full = builder.sub(count, builder.srem(count, w))
        with cgutils.for_range_slice(builder, ir.Constant(count.type, 0), full, w) as (j, _):
            step(j, None)
        left = builder.sub(count, full)
        with builder.if_then(builder.icmp_signed(">", left, ir.Constant(count.type, 0))):
            step(full, _lane_mask(builder, left))
        builder.store(builder.load(s0), p0, align=4)
        builder.store(builder.load(s1), p1, align=4)
        return context.get_dummy_value()

    return types.void(gs, xs, n, m, acc0, acc1, off), codegen


def row_lanes(gs, xs, n, m, acc0, acc1, off):
    """:func:`_row_lanes16` where it applies (16-bit data on the SIMD path, float32 data on the same CPUs,
    a float32 ``m``), returning ``True``; elsewhere it does nothing and returns ``False`` (a compile-time
    constant)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


def has_row_lanes(gs, means):
    """Whether :func:`row_lanes` runs for data ``gs`` and per-channel means ``means`` (an array; a
    compile-time constant)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


def row_lanes_type(gs, means) -> bool:
    """:func:`has_row_lanes` on numba types (for an ``@overload`` that compiles only the code its data takes)."""
    return _simd_sums(gs) and isinstance(means, types.Array) and means.dtype == types.float32


@overload(has_row_lanes, inline="always")
def _has_row_lanes_impl(gs, means):
    v = row_lanes_type(gs, means)
    return lambda gs, means: v


@overload(row_lanes, inline="always")
def _row_lanes_impl(gs, xs, n, m, acc0, acc1, off):
    if _simd_sums(gs) and m == types.float32:

        def vector(gs, xs, n, m, acc0, acc1, off):
            _row_lanes16(gs, xs, n, m, acc0, acc1, off)
            return True

        return vector
    return lambda gs, xs, n, m, acc0, acc1, off: False


def simd16(a):
    """Whether array ``a`` takes the 16-wide SIMD code (a compile-time constant in jitted code): the block
    sizes of :mod:`bnkit.kernels.cpu.passes` follow it."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(simd16, inline="always")
def _simd16_flag_impl(a):
    v = simd16_type(a)
    return lambda a: v


def nsc_tile(xs):
    """:data:`NSC_TILE` for 16-bit data on the SIMD path, else 1 (one loop per row)."""
    raise NotImplementedError  # replaced by the overload inside jitted code


@overload(nsc_tile)
def _nsc_tile_impl(xs):
    n = NSC_TILE if simd16_type(xs) else 1
    return lambda xs: n
