"""Fused Triton step of the Stable-SPAM optimizer, for one parameter tensor or many in the same three launches.

:func:`triton_update_tensor` computes what :func:`hf_gns_spam.optim.stable_spam._update_tensor` computes (same state
layout, same formulas, the same float32/float64 roundings where it matters), in three passes over memory instead of
about fifteen torch kernels. For a tensor W with gradient g at AdaClip/AdaGN step k and Adam step a (elementwise work
in float32, the per-tensor statistics T, μ, ν in float64):

0. non-finite gradient entries (NaN, ±inf) count as 0 everywhere below; a step in which the tensor had one adds 1 to
   ``state["nonfinite_grad_steps"]`` (an int64 counter);
1. decoupled weight decay ``W ← W·(1 − lr·wd)``, rounded to W's dtype (as torch's in-place ``mul_``);
2. AdaClip: ``T ← lerp(T, max|g|, 1 − γ3)``, ``T̂ = T / (1 − γ3^k)`` (float64, rounded to float32 for the
   comparison), ``g̃_i = g_i · (T̂ / max|g|)`` where ``|g_i| > T̂``, else ``g_i``;
3. AdaGN: ``n = s·√Σ(g̃/s)²`` with s a power of two (below), ``μ ← lerp(μ, n, w1)``, ``ν ← lerp(ν, n·n, w2)``,
   ``c = (μ / (1 − γ1^k)) / (√(ν / (1 − γ2^k)) + ε)`` (float64), ``ĝ = (g̃/s) · (c / (n/s))`` (``ĝ = g̃`` when
   n = 0); faithful: ``w1 = 1 − γ1``, ``w2 = 1 − γ2``; clean: the same times ``[n > 0]`` (a zero-norm tensor keeps
   μ, ν);
4. MoRet: clean mode reads m = v = 0 on a reset step (a fresh first Adam step); faithful mode updates with the old
   moments and stores m = v = 0 afterwards;
5. Adam: ``m ← lerp(m, ĝ, 1 − β1)``, ``v ← β2·v + (1 − β2)·ĝ·ĝ``,
   ``W ← W + (−lr·√bc2/bc1)·m / (√v + ε·√bc2)`` with ``bc1 = 1 − β1^a``, ``bc2 = 1 − β2^a``; in clean mode a
   zero-norm tensor uses weight 0 for m, decay 1 for v and an infinite denominator, so m, v and W stay as they are
   (weight decay still applies). Moments are loaded and updated in float32 and stored in their own dtype (float32,
   or bfloat16 rounded to nearest even for ``state_bits=16``); W is stored in its dtype.

The scale s keeps ``Σ(g̃/s)²`` in float32 range for any finite gradient: with E the binary exponent of
``min(max|g|, T̂)`` (the largest |g̃|), ``s = 2^(E − clamp(E, −40, 40))``, so s = 1 (and the computation is the
unscaled one) for every gradient whose largest clipped entry lies in [2^-40, 2^41). The hyperparameter constants
(1 − γ, bias corrections, ε) are float32 kernel arguments, used in float64 arithmetic; the torch path rounds them to
float32 the same way.

``lerp(a, b, w)`` is torch's: ``a + w·(b − a)`` for ``|w| < 0.5``, else ``b − (b − a)·(1 − w)``. float32 divisions
and square roots are IEEE-rounded (``div_rn``, ``sqrt_rn``), as in torch; float64 ones are IEEE by definition.

Kernel plan (no host synchronisation: the per-tensor scalars live in a small float64 workspace on the device). The
tensor is a flat contiguous array of n elements cut into blocks of ``BLOCK`` elements; each kernel runs
``P = min(⌈n / BLOCK⌉, max_programs)`` programs, program p handling blocks p, p + P, p + 2P, … (a grid-stride loop),
so every partial-result buffer has at most ``max_programs`` entries. Whole blocks are read and written unmasked (16
bytes at a time when every array starts on 16 bytes), the partial last block masked::

    K1 _max_abs_kernel:        pmax[p] = max |g| over p's finite entries, pbad[p] = its count of non-finite ones;
                               program 0 snapshots T, μ, ν into the workspace.
    K2 _clipped_sumsq_kernel:  every program reduces pmax[0:P] → max|g| (same order in every program, so the same
                               value), computes T, T̂, T̂/max|g| and s from the snapshot; pss[p] = Σ (g̃/s)² over p's
                               blocks; program 0 writes T and the non-finite counter to the state and T̂,
                               (T̂/max|g|)/s, 1/s and s to the workspace.
    K3 _update_kernel:         every program reduces pss[0:P] → n, computes μ, ν and the AdaGN factor from the
                               snapshot; program 0 writes μ, ν to the state; then the fused elementwise pass
                               (weight decay, clip, AdaGN scale, MoRet, Adam moments, parameter update, stores).

Many tensors, one launch (:func:`triton_update_tensors`, what the optimizer calls): each launch reads an int64
table with one row per tensor (its element count and the addresses of its gradient, parameter, moments, statistics
and workspace row, ``_T_NUMEL`` … ``_T_WORKSPACE``) over a grid of (max_t P_t) × tensors; program (p, t) does what
program p of tensor t's own launch would do and exits when p ≥ P_t. A tensor's blocks, programs and reductions do
not depend on the other tensors, so grouping changes no bit of the result; it turns three launches per tensor into
three per group of tensors that share their dtypes, moment format and alignment, which is what keeps the host's
cost of a step of a model with hundreds of tensors below the GPU's.

The snapshot makes the in-place scalar updates race-free: within a kernel the programs read the old statistics from
the workspace while program 0 overwrites the state tensors. The reductions are two-stage with a launch
configuration that depends only on n, ``BLOCK`` and ``max_programs``, so results are bitwise deterministic (no
atomics). Under the Triton interpreter (CPU tests) the float32 → bfloat16 stores round to nearest even on the bits,
because the interpreter's own conversion truncates.

Sharded tensors (FSDP2; :mod:`hf_gns_spam.optim.stable_spam` drives this): max|g| and Σ(g̃/s)² must cover the whole
logical tensor, so the three kernels are also callable one at a time (:class:`StepLaunches`, over many tensors
whose workspace rows the caller gives, their partial buffers at a fixed ``stride``): between K1 and K2 the caller
reduces each row's pmax/pbad across the ranks and writes the global values back into every slot of
pmax (and pbad[0], the rest 0); between K2 and K3 it does the same with the sum of pss in pss[0]. A rank whose shard
is empty runs the kernels on n = 0 (the scalar work only), so every rank computes the replicated statistics with
the same code.

Requirements (checked on the host from metadata only): parameter and moments contiguous; parameter of dtype
float32, bfloat16 or float16 (float64 parameters, whose compute dtype is float64, are not supported); gradient of one
of those dtypes (a non-contiguous gradient is copied); moments float32 or bfloat16, or blockwise-quantized
(``quantized_bits`` 8 or 4, the layout of :mod:`hf_gns_spam.optim.quantized_state`); the three statistics 0-dim
float64 tensors and the counter a 0-dim int64 one; everything on one CUDA device (or on the CPU under
``TRITON_INTERPRET=1``).

Quantized moments (K3 with ``QUANTIZED``; the formats of ``STATE_FORMATS`` whose indices are packed one or two per
byte, ``INDICES_PER_BYTE``, and whose moments share a block size): BLOCK must be a multiple of the quantization block
(256 at 8 bits, 128 at 4), so a program holds whole quantization blocks, laid out as [BLOCK/QBLOCK, QBLOCK/2, 2]
(element pairs: one byte of two 4-bit indices, the even element in the high nibble). Each moment is dequantized in
registers (``code[index]·absmax``, the code map gathered from a small table), updated as above in float32, and
requantized as ``quantize`` does: absmax = max|x| per quantization block (NaN-propagating), x / absmax (x / 1 when
absmax is not > 0), and the nearest code by a BITS-step binary search over the float32 midpoints
``(code[1:] + code[:-1]) / 2`` that counts the midpoints b with ``not (b >= x)``, torch.bucketize(right=False)'s
rule (a tie takes the lower code, NaN the last one). Given the same float32 moments, the stored indices and absmax
are bitwise those of ``quantize``. :func:`triton_update_supported` answers whether a tensor qualifies, so a caller can
fall back to the torch path.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from hf_gns_spam.kernels.rounding import bfloat16_bits, cast, interpreting
from hf_gns_spam.kernels.step_contract import (
    ABSMAX,
    EXP_AVG,
    EXP_AVG_SQ,
    INDICES,
    MOMENTS,
    NONFINITE_GRAD_STEPS,
    QUANTIZED_BITS,
    STATE_FORMATS,
    STATISTICS,
    StateFormat,
    StepHyperparameters,
)

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_MAX_PROGRAMS",
    "PARTIALS_OFFSET",
    "StepLaunches",
    "StepTensor",
    "num_programs",
    "triton_update_supported",
    "triton_update_tensor",
    "triton_update_tensors",
    "workspace_numel",
]

#: Elements per block (one iteration of a program's loop); 8 warps → 8 float32 per thread.
DEFAULT_BLOCK = 2048
_NUM_WARPS = 8
#: Upper bound on the programs of each kernel (about one wave of 8-warp programs on an H100's 132 SMs); also the
#: size of the partial-result buffers that every program of the next kernel reduces.
DEFAULT_MAX_PROGRAMS = 1024

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The dtypes of unquantized moments the update kernel loads (M_DTYPE); moments of other dtypes take the torch path.
_MOMENT_DTYPES = (torch.float32, torch.bfloat16)
#: The packings of quantized indices the update kernel reads and writes (``_dequantize``, ``_store_quantized``).
_INDICES_PER_BYTE = (1, 2)
#: s = 2^(E − clamp(E, −_SCALE_RANGE, _SCALE_RANGE)); also in :mod:`hf_gns_spam.optim.torch_step`.
_SCALE_RANGE = tl.constexpr(40)

# Workspace layout (float64): snapshot of the statistics, the AdaClip scalars, then the three partial buffers of
# ``stride`` entries each. (tl.constexpr: the only kind of global a kernel may read when compiled.)
_WS_CLIP_EMA = tl.constexpr(0)  # T before the step
_WS_NORM_EMA = tl.constexpr(1)  # μ before the step
_WS_NORM_SQ_EMA = tl.constexpr(2)  # ν before the step
_WS_THRESHOLD = tl.constexpr(3)  # T̂ (a float32 value)
_WS_SPIKE_FACTOR = tl.constexpr(4)  # (T̂ / max|g|) / s (a float32 value)
_WS_INV_SCALE = tl.constexpr(5)  # 1 / s (a float32 power of two)
_WS_SCALE = tl.constexpr(6)  # s (a float32 power of two)
_WS_PARTIALS = tl.constexpr(8)  # pmax[0:stride], pbad[0:stride], pss[0:stride]
#: Index of the first partial buffer in a workspace row (pmax; pbad and pss follow at ``stride`` intervals).
PARTIALS_OFFSET = _WS_PARTIALS.value


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------------

# The tensor table: one int64 row of TABLE_COLUMNS per tensor, its element count and the addresses (data_ptr) of
# its tensors; unused columns hold 0. (tl.constexpr: the only kind of global a kernel may read when compiled.)
_T_NUMEL = tl.constexpr(0)
_T_GRAD = tl.constexpr(1)
_T_PARAM = tl.constexpr(2)
_T_EXP_AVG = tl.constexpr(3)  # m (float32/bfloat16), or its 8/4-bit indices
_T_EXP_AVG_SQ = tl.constexpr(4)  # v, or its indices
_T_EXP_AVG_ABSMAX = tl.constexpr(5)  # m's absmax per quantization block (quantized moments only)
_T_EXP_AVG_SQ_ABSMAX = tl.constexpr(6)
_T_CLIP_EMA = tl.constexpr(7)
_T_NORM_EMA = tl.constexpr(8)
_T_NORM_SQ_EMA = tl.constexpr(9)
_T_NONFINITE = tl.constexpr(10)
_T_WORKSPACE = tl.constexpr(11)  # the tensor's float64 workspace row
TABLE_COLUMNS = 12
_TABLE_COLUMNS = tl.constexpr(TABLE_COLUMNS)


@triton.jit
def _table_entry(TABLE, column):
    """Column ``column`` of the row of this program's tensor (``program_id(1)``)."""
    return tl.load(TABLE + tl.program_id(1).to(tl.int64) * _TABLE_COLUMNS + column)


@triton.jit
def _tensor(TABLE, column, dtype: tl.constexpr, ALIGNED: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """Pointer to the ``dtype`` elements whose address is in ``column``. Under the interpreter bfloat16 elements are
    addressed as uint16 (it cannot load bfloat16 through an address); ALIGNED: the address is a multiple of 16 bytes
    (the launcher checked), so that whole blocks load and store 16 bytes at a time."""
    address = _table_entry(TABLE, column)
    if MANUAL_BF16 and dtype == tl.bfloat16:
        pointer = address.to(tl.pointer_type(tl.uint16))
    else:
        pointer = address.to(tl.pointer_type(dtype))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _load_float(pointer, idx, mask, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr, MASKED: tl.constexpr):
    """The float32 values of the ``dtype`` elements at ``idx`` (0 where ``mask`` is off, when MASKED)."""
    if MASKED:
        x = tl.load(pointer + idx, mask=mask, other=0)
    else:
        x = tl.load(pointer + idx)
    if MANUAL_BF16 and dtype == tl.bfloat16:
        x = (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)  # bfloat16 bits → float32, exact
    return x.to(tl.float32)


@triton.jit
def _store_float(pointer, idx, value, mask, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr, MASKED: tl.constexpr):
    """Store float32 ``value`` rounded to nearest even in ``dtype`` at ``idx`` (only where ``mask``, when MASKED)."""
    if MANUAL_BF16 and dtype == tl.bfloat16:
        out = bfloat16_bits(value)
    else:
        out = value.to(dtype)
    if MASKED:
        tl.store(pointer + idx, out, mask=mask)
    else:
        tl.store(pointer + idx, out)


@triton.jit
def _programs(n, max_programs, BLOCK: tl.constexpr):
    """P = min(⌈n / BLOCK⌉, max_programs), at least 1: the programs that work on a tensor of n elements."""
    return tl.maximum(tl.minimum(tl.cdiv(n, BLOCK), max_programs), 1)


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula: ``start + w·(end − start)`` for ``|w| < 0.5``, else ``end − (end − start)·(1 − w)``."""
    return tl.where(tl.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _finite(g):
    """g with its non-finite entries (NaN, ±inf) replaced by 0."""
    return tl.where(tl.abs(g) < float("inf"), g, 0.0)


@triton.jit
def _power_of_two_scale(clipped_max):
    """(1/s, s) as float32 powers of two, s = 2^(E − clamp(E, −40, 40)) with E the exponent of ``clipped_max``
    (a finite float32 >= 0; 0 and subnormals count as E = −127)."""
    exponent = (clipped_max.to(tl.int32, bitcast=True) >> 23) - 127
    shift = exponent - tl.minimum(tl.maximum(exponent, -_SCALE_RANGE), _SCALE_RANGE)
    inv_scale = ((127 - shift) << 23).to(tl.float32, bitcast=True)
    scale = ((127 + shift) << 23).to(tl.float32, bitcast=True)
    return inv_scale, scale


@triton.jit
def _max_abs_block(G, idx, n, acc, bad, G_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr, MASKED: tl.constexpr):
    """K1's work on one block: the running max of |g| over finite entries and the count of non-finite ones."""
    g = tl.abs(_load_float(G, idx, idx < n, G_DTYPE, MANUAL_BF16, MASKED))
    finite = g < float("inf")  # NaN compares False
    return tl.maximum(acc, tl.where(finite, g, 0.0)), bad + tl.where(finite, 0, 1)


@triton.jit
def _max_abs_kernel(
    TABLE,
    max_programs,
    stride,
    G_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """K1: ``pmax[p] = max |g|`` over program p's finite entries and ``pbad[p]`` = the count of non-finite ones;
    program 0 snapshots T, μ, ν into the workspace."""
    pid = tl.program_id(0)
    n = _table_entry(TABLE, _T_NUMEL)
    programs = _programs(n, max_programs, BLOCK)
    if pid < programs:
        G = _tensor(TABLE, _T_GRAD, G_DTYPE, ALIGNED, MANUAL_BF16)
        WS = _tensor(TABLE, _T_WORKSPACE, tl.float64, False, False)
        offsets = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        full_blocks = n // BLOCK  # unmasked; the partial last block (if any) is program full_blocks % P's
        for b in range(pid, full_blocks, programs):
            idx = tl.multiple_of(b * BLOCK, BLOCK) + offsets
            acc, bad = _max_abs_block(G, idx, n, acc, bad, G_DTYPE, MANUAL_BF16, False)
        if full_blocks % programs == pid and full_blocks * BLOCK < n:
            acc, bad = _max_abs_block(G, full_blocks * BLOCK + offsets, n, acc, bad, G_DTYPE, MANUAL_BF16, True)
        tl.store(WS + _WS_PARTIALS + pid, tl.max(acc, 0).to(tl.float64))
        tl.store(WS + _WS_PARTIALS + stride + pid, tl.sum(bad, 0).to(tl.float64))
        if pid == 0:
            tl.store(WS + _WS_CLIP_EMA, tl.load(_tensor(TABLE, _T_CLIP_EMA, tl.float64, False, False)))
            tl.store(WS + _WS_NORM_EMA, tl.load(_tensor(TABLE, _T_NORM_EMA, tl.float64, False, False)))
            tl.store(WS + _WS_NORM_SQ_EMA, tl.load(_tensor(TABLE, _T_NORM_SQ_EMA, tl.float64, False, False)))


@triton.jit
def _clipped_sumsq_block(
    G, idx, n, acc, threshold, spike_factor, inv_scale, G_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """K2's work on one block: the running sum of (g̃/s)²."""
    g = _finite(_load_float(G, idx, idx < n, G_DTYPE, MANUAL_BF16, MASKED))
    clipped = g * tl.where(tl.abs(g) > threshold, spike_factor, inv_scale)
    return acc + clipped * clipped


@triton.jit
def _clipped_sumsq_kernel(
    TABLE,
    max_programs,
    stride,
    clip_weight,  # 1 − γ3
    clip_bias_correction,  # 1 − γ3^k
    G_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
):
    """K2: max|g|, T, T̂, T̂/max|g| and s (every program, from the snapshot); ``pss[p] = Σ (g̃/s)²`` over p's
    blocks; program 0 stores T, the non-finite counter and the AdaClip scalars."""
    pid = tl.program_id(0)
    n = _table_entry(TABLE, _T_NUMEL)
    programs = _programs(n, max_programs, BLOCK)
    if pid < programs:
        G = _tensor(TABLE, _T_GRAD, G_DTYPE, ALIGNED, MANUAL_BF16)
        WS = _tensor(TABLE, _T_WORKSPACE, tl.float64, False, False)
        partial_offsets = tl.arange(0, PARTIALS_BLOCK)
        in_use = partial_offsets < programs
        grad_max = tl.max(tl.load(WS + _WS_PARTIALS + partial_offsets, mask=in_use, other=0.0), 0).to(tl.float32)
        bad = tl.sum(tl.load(WS + _WS_PARTIALS + stride + partial_offsets, mask=in_use, other=0.0), 0) > 0
        clip_max_ema = _lerp(tl.load(WS + _WS_CLIP_EMA), grad_max.to(tl.float64), tl.cast(clip_weight, tl.float64))
        threshold64 = clip_max_ema / tl.cast(clip_bias_correction, tl.float64)
        threshold = threshold64.to(tl.float32)
        # inf or nan only when max|g| = 0, and then no entry exceeds the threshold
        ratio = (threshold64 / grad_max.to(tl.float64)).to(tl.float32)
        inv_scale, scale = _power_of_two_scale(tl.minimum(grad_max, threshold))
        spike_factor = ratio * inv_scale

        offsets = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        full_blocks = n // BLOCK
        for b in range(pid, full_blocks, programs):
            idx = tl.multiple_of(b * BLOCK, BLOCK) + offsets
            acc = _clipped_sumsq_block(G, idx, n, acc, threshold, spike_factor, inv_scale, G_DTYPE, MANUAL_BF16, False)
        if full_blocks % programs == pid and full_blocks * BLOCK < n:
            idx = full_blocks * BLOCK + offsets
            acc = _clipped_sumsq_block(G, idx, n, acc, threshold, spike_factor, inv_scale, G_DTYPE, MANUAL_BF16, True)
        tl.store(WS + _WS_PARTIALS + 2 * stride + pid, tl.sum(acc, 0).to(tl.float64))
        if pid == 0:
            NONFINITE = _tensor(TABLE, _T_NONFINITE, tl.int64, False, False)
            tl.store(_tensor(TABLE, _T_CLIP_EMA, tl.float64, False, False), clip_max_ema)
            tl.store(NONFINITE, tl.load(NONFINITE) + bad.to(tl.int64))
            tl.store(WS + _WS_THRESHOLD, threshold.to(tl.float64))
            tl.store(WS + _WS_SPIKE_FACTOR, spike_factor.to(tl.float64))
            tl.store(WS + _WS_INV_SCALE, inv_scale.to(tl.float64))
            tl.store(WS + _WS_SCALE, scale.to(tl.float64))


@triton.jit
def _step_scalars(
    TABLE,
    WS,
    programs,
    stride,
    norm_weight,
    norm_sq_weight,
    norm_bias_correction,
    norm_sq_bias_correction,
    eps,
    beta1_weight,
    beta2,
    denominator_eps,
    FAITHFUL: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
):
    """K3's prologue: n from pss[0:P], μ and ν (program 0 stores them), the AdaGN factor c/(n/s), the AdaClip
    scalars, and the Adam weights of this step (a clean-mode zero-norm tensor gets the "keep everything" ones).

    Returns (T̂, (T̂/max|g|)/s, 1/s, c/(n/s), weight of m's EMA, decay of v, ε term of the denominator)."""
    partial_offsets = tl.arange(0, PARTIALS_BLOCK)
    partials = tl.load(WS + _WS_PARTIALS + 2 * stride + partial_offsets, mask=partial_offsets < programs, other=0.0)
    scaled_norm = tl.sqrt(tl.sum(partials, 0)).to(tl.float32)  # n/s
    scaled_norm64 = scaled_norm.to(tl.float64)
    norm = scaled_norm64 * tl.load(WS + _WS_SCALE)
    has_norm = scaled_norm > 0
    active = has_norm.to(tl.float64)
    w1 = tl.cast(norm_weight, tl.float64)
    w2 = tl.cast(norm_sq_weight, tl.float64)
    if FAITHFUL:
        norm_ema = _lerp(tl.load(WS + _WS_NORM_EMA), norm, w1)
        norm_sq_ema = _lerp(tl.load(WS + _WS_NORM_SQ_EMA), norm * norm, w2)
    else:  # clean: a zero-norm tensor keeps its statistics (EMA weight 0)
        norm_ema = _lerp(tl.load(WS + _WS_NORM_EMA), norm, active * w1)
        norm_sq_ema = _lerp(tl.load(WS + _WS_NORM_SQ_EMA), norm * norm, active * w2)
    norm_sq_ema_hat_sqrt = tl.sqrt(norm_sq_ema / tl.cast(norm_sq_bias_correction, tl.float64))
    adagn_scale = (norm_ema / tl.cast(norm_bias_correction, tl.float64)) / (
        norm_sq_ema_hat_sqrt + tl.cast(eps, tl.float64)
    )
    factor = tl.where(has_norm, adagn_scale / tl.where(has_norm, scaled_norm64, 1.0), 1.0).to(tl.float32)
    if tl.program_id(0) == 0:
        tl.store(_tensor(TABLE, _T_NORM_EMA, tl.float64, False, False), norm_ema)
        tl.store(_tensor(TABLE, _T_NORM_SQ_EMA, tl.float64, False, False), norm_sq_ema)
    threshold = tl.load(WS + _WS_THRESHOLD).to(tl.float32)
    spike_factor = tl.load(WS + _WS_SPIKE_FACTOR).to(tl.float32)
    inv_scale = tl.load(WS + _WS_INV_SCALE).to(tl.float32)
    if FAITHFUL:
        m_weight = beta1_weight
        v_decay = beta2
        eps_term = denominator_eps
    else:  # a skipped tensor keeps m and v (ĝ is 0: EMA weight 0, decay 1) and gets an infinite denominator
        m_weight = has_norm.to(tl.float32) * beta1_weight
        v_decay = tl.where(has_norm, beta2, 1.0)
        eps_term = tl.where(has_norm, denominator_eps, float("inf"))
    return threshold, spike_factor, inv_scale, factor, m_weight, v_decay, eps_term


@triton.jit
def _adam_elementwise(
    w, g, m, v, threshold, spike_factor, inv_scale, factor, m_weight, v_decay, beta2_weight, eps_term, step_size
):
    """Clip (and scale by 1/s), AdaGN factor (ĝ), Adam's moments and the parameter update, all float32; ``g`` has
    its non-finite entries zeroed already. Returns (W, m, v)."""
    update = g * tl.where(tl.abs(g) > threshold, spike_factor, inv_scale) * factor  # ĝ
    m = _lerp(m, update, m_weight)
    v = v * v_decay + beta2_weight * update * update
    denominator = tl.sqrt_rn(v) + eps_term
    w = w + tl.div_rn(step_size * m, denominator)
    return w, m, v


@triton.jit
def _load_param_and_grad(
    W, G, idx, mask, decay, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, APPLY_DECAY: tl.constexpr,
    MANUAL_BF16: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """(W after weight decay, g with its non-finite entries zeroed), float32, at ``idx`` (any shape); 0 where masked."""
    w = _load_float(W, idx, mask, W_DTYPE, MANUAL_BF16, MASKED)
    if APPLY_DECAY:  # torch's in-place mul_ rounds to W's dtype before the update
        w = cast(w * decay, W_DTYPE, MANUAL_BF16).to(tl.float32)
    g = _finite(_load_float(G, idx, mask, G_DTYPE, MANUAL_BF16, MASKED))
    return w, g


@triton.jit
def _update_block(
    W, G, M, V, idx, n, decay, threshold, spike_factor, inv_scale, factor, m_weight, v_decay, beta2_weight, eps_term,
    step_size, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, APPLY_DECAY: tl.constexpr,
    FAITHFUL: tl.constexpr, RESET: tl.constexpr, MANUAL_BF16: tl.constexpr, MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """K3's elementwise pass over one block of float32/bfloat16 moments."""
    mask = idx < n
    w, g = _load_param_and_grad(W, G, idx, mask, decay, W_DTYPE, G_DTYPE, APPLY_DECAY, MANUAL_BF16, MASKED)
    # moments as flat float32/bfloat16 elements, not _update_quantized_moments' (index, absmax) blocks: kept apart
    if RESET and not FAITHFUL:  # clean MoRet: zero moments before the update
        m = tl.zeros([BLOCK], dtype=tl.float32)
        v = tl.zeros([BLOCK], dtype=tl.float32)
    else:
        m = _load_float(M, idx, mask, M_DTYPE, MANUAL_BF16, MASKED)
        v = _load_float(V, idx, mask, M_DTYPE, MANUAL_BF16, MASKED)
    w, m, v = _adam_elementwise(
        w, g, m, v, threshold, spike_factor, inv_scale, factor, m_weight, v_decay, beta2_weight, eps_term, step_size
    )
    _store_float(W, idx, w, mask, W_DTYPE, MANUAL_BF16, MASKED)
    if RESET and FAITHFUL:  # faithful MoRet: the update used the old moments; zero them now
        m = tl.zeros([BLOCK], dtype=tl.float32)
        v = tl.zeros([BLOCK], dtype=tl.float32)
    _store_float(M, idx, m, mask, M_DTYPE, MANUAL_BF16, MASKED)
    _store_float(V, idx, v, mask, M_DTYPE, MANUAL_BF16, MASKED)


@triton.jit
def _update_float_moments(
    W, G, TABLE, pid, programs, n, decay, threshold, spike_factor, inv_scale, factor, m_weight, v_decay, beta2_weight,
    eps_term, step_size, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    APPLY_DECAY: tl.constexpr, FAITHFUL: tl.constexpr, RESET: tl.constexpr, MANUAL_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """K3's elementwise pass over program ``pid``'s blocks with float32/bfloat16 moments: whole blocks unmasked,
    the partial last block (program full_blocks % P's) masked."""
    M = _tensor(TABLE, _T_EXP_AVG, M_DTYPE, ALIGNED, MANUAL_BF16)
    V = _tensor(TABLE, _T_EXP_AVG_SQ, M_DTYPE, ALIGNED, MANUAL_BF16)
    offsets = tl.arange(0, BLOCK)
    full_blocks = n // BLOCK
    for b in range(pid, full_blocks, programs):
        idx = tl.multiple_of(b * BLOCK, BLOCK) + offsets
        _update_block(
            W, G, M, V, idx, n, decay, threshold, spike_factor, inv_scale, factor, m_weight, v_decay, beta2_weight,
            eps_term, step_size, W_DTYPE, G_DTYPE, M_DTYPE, APPLY_DECAY, FAITHFUL, RESET, MANUAL_BF16, False, BLOCK,
        )  # fmt: skip
    if full_blocks % programs == pid and full_blocks * BLOCK < n:
        _update_block(
            W, G, M, V, full_blocks * BLOCK + offsets, n, decay, threshold, spike_factor, inv_scale, factor, m_weight,
            v_decay, beta2_weight, eps_term, step_size, W_DTYPE, G_DTYPE, M_DTYPE, APPLY_DECAY, FAITHFUL, RESET,
            MANUAL_BF16, True, BLOCK,
        )  # fmt: skip


@triton.jit
def _dequantize(Q, ABSMAX, CODE, rows, idx, mask, pairs, n, INDICES_PER_BYTE: tl.constexpr, QBLOCK: tl.constexpr):
    """float32 values ``code[index]·absmax`` of the elements ``idx`` ([ROWS, QBLOCK/2, 2], row r = quantization
    block ``rows[r]``; ``pairs`` [ROWS, QBLOCK/2] are the byte offsets of 4-bit index pairs); 0 where masked."""
    absmax = tl.load(ABSMAX + rows, mask=rows * QBLOCK < n, other=0.0)
    if INDICES_PER_BYTE == 1:
        index = tl.load(Q + idx, mask=mask, other=0).to(tl.int32)
    else:  # two indices per byte, the even element in the high nibble
        packed = tl.load(Q + pairs, mask=pairs * 2 < n, other=0).to(tl.int32)
        index = tl.join(packed >> 4, packed & 0x0F)
    values = tl.load(CODE + index) * absmax[:, None, None]
    return tl.where(mask, values, 0.0)


@triton.jit
def _quantize(x, MIDPOINTS, BITS: tl.constexpr):
    """``quantize`` of a [ROWS, QBLOCK/2, 2] float32 tensor whose row r is quantization block r (0 beyond the
    tensor, as the padding of ``quantize``): returns (int32 code indices, float32 absmax per row).

    absmax = max|x| over the row (NaN if the row holds a NaN, as torch.amax); normalized = x / absmax (x / 1 where
    absmax is not > 0, NaN included, as ``torch.where(absmax > 0, absmax, 1.0)``); index = the number of midpoints
    b with ``not (b >= normalized)``: torch.bucketize(right=False)'s lower bound (its CPU/CUDA loops test
    ``!(mid >= value)``), so a value equal to a midpoint takes the lower code and NaN takes the last index. The
    count is a binary search over the ``2**BITS − 1`` sorted midpoints: BITS steps, each adding 2^j when the
    midpoint just below index + 2^j is still below the value."""
    has_nan = tl.max(tl.max((x != x).to(tl.int32), 2), 1) > 0
    absmax = tl.where(has_nan, float("nan"), tl.max(tl.max(tl.abs(x), 2), 1))
    normalized = tl.div_rn(x, tl.where(absmax > 0, absmax, 1.0)[:, None, None])
    index = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(BITS):
        step = 1 << (BITS - 1 - i)
        midpoint = tl.load(MIDPOINTS + index + (step - 1))
        index = tl.where(midpoint >= normalized, index, index + step)
    return index, absmax


@triton.jit
def _store_quantized(
    Q, ABSMAX, index, absmax, rows, idx, mask, pairs, n, INDICES_PER_BYTE: tl.constexpr, QBLOCK: tl.constexpr
):
    """Store the indices (two per byte: packed in pairs, a missing odd last element as index 0) and the absmax."""
    tl.store(ABSMAX + rows, absmax, mask=rows * QBLOCK < n)
    if INDICES_PER_BYTE == 1:
        tl.store(Q + idx, index.to(tl.uint8), mask=mask)
    else:
        high, low = tl.split(tl.where(mask, index, 0))
        tl.store(Q + pairs, ((high << 4) | low).to(tl.uint8), mask=pairs * 2 < n)


@triton.jit
def _update_quantized_moments(
    W, G, TABLE, CODES_TABLE, pid, programs, n, decay, threshold, spike_factor, inv_scale, factor, m_weight, v_decay,
    beta2_weight, eps_term, step_size, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    APPLY_DECAY: tl.constexpr, FAITHFUL: tl.constexpr, RESET: tl.constexpr, MANUAL_BF16: tl.constexpr,
    BITS: tl.constexpr, INDICES_PER_BYTE: tl.constexpr, QBLOCK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """K3's elementwise pass with blockwise-quantized moments, dequantized from (index, absmax) in registers and
    requantized after the update. A program's block of BLOCK elements is BLOCK/QBLOCK whole quantization blocks, laid
    out as [rows, QBLOCK/2, 2] (element pairs, for the 4-bit packing); every access is masked (the 4-bit pairs and
    the absmax rows have their own bounds). ``CODES_TABLE``: float32 m's code, v's code, m's midpoints, v's
    midpoints (2^BITS entries each)."""
    M_Q = _tensor(TABLE, _T_EXP_AVG, tl.uint8, ALIGNED, False)
    V_Q = _tensor(TABLE, _T_EXP_AVG_SQ, tl.uint8, ALIGNED, False)
    M_ABSMAX = _tensor(TABLE, _T_EXP_AVG_ABSMAX, tl.float32, ALIGNED, False)
    V_ABSMAX = _tensor(TABLE, _T_EXP_AVG_SQ_ABSMAX, tl.float32, ALIGNED, False)
    ROWS: tl.constexpr = BLOCK // QBLOCK
    HALF: tl.constexpr = QBLOCK // 2
    CODES: tl.constexpr = 1 << BITS
    row_offsets = tl.arange(0, ROWS)
    pair_offsets = tl.arange(0, HALF)
    in_row = tl.join(pair_offsets * 2, pair_offsets * 2 + 1)  # [HALF, 2]: element offsets within a row
    for b in range(pid, tl.cdiv(n, BLOCK), programs):
        rows = b * ROWS + row_offsets
        idx = rows[:, None, None] * QBLOCK + in_row[None, :, :]
        pairs = rows[:, None] * HALF + pair_offsets[None, :]
        mask = idx < n
        w, g = _load_param_and_grad(W, G, idx, mask, decay, W_DTYPE, G_DTYPE, APPLY_DECAY, MANUAL_BF16, True)
        # moments in quantization blocks (packed nibbles at 4 bits), not the float elements of _update_block
        if RESET and not FAITHFUL:
            m = tl.zeros([ROWS, HALF, 2], dtype=tl.float32)
            v = tl.zeros([ROWS, HALF, 2], dtype=tl.float32)
        else:
            m = _dequantize(M_Q, M_ABSMAX, CODES_TABLE, rows, idx, mask, pairs, n, INDICES_PER_BYTE, QBLOCK)
            v = _dequantize(V_Q, V_ABSMAX, CODES_TABLE + CODES, rows, idx, mask, pairs, n, INDICES_PER_BYTE, QBLOCK)
        w, m, v = _adam_elementwise(
            w, g, m, v, threshold, spike_factor, inv_scale, factor, m_weight, v_decay, beta2_weight, eps_term,
            step_size,
        )  # fmt: skip
        _store_float(W, idx, w, mask, W_DTYPE, MANUAL_BF16, True)
        if RESET and FAITHFUL:
            m = tl.zeros([ROWS, HALF, 2], dtype=tl.float32)
            v = tl.zeros([ROWS, HALF, 2], dtype=tl.float32)
        else:  # elements beyond the tensor are quantize's zero padding
            m = tl.where(mask, m, 0.0)
            v = tl.where(mask, v, 0.0)
        m_index, m_absmax = _quantize(m, CODES_TABLE + 2 * CODES, BITS)
        _store_quantized(M_Q, M_ABSMAX, m_index, m_absmax, rows, idx, mask, pairs, n, INDICES_PER_BYTE, QBLOCK)
        v_index, v_absmax = _quantize(v, CODES_TABLE + 3 * CODES, BITS)
        _store_quantized(V_Q, V_ABSMAX, v_index, v_absmax, rows, idx, mask, pairs, n, INDICES_PER_BYTE, QBLOCK)


@triton.jit
def _update_kernel(
    TABLE,
    CODES_TABLE,  # quantized moments' code maps and midpoints (QUANTIZED); any pointer otherwise
    max_programs,
    stride,
    decay,  # 1 − lr·weight_decay
    norm_weight,  # 1 − γ1
    norm_sq_weight,  # 1 − γ2
    norm_bias_correction,  # 1 − γ1^k
    norm_sq_bias_correction,  # 1 − γ2^k
    eps,
    beta1_weight,  # 1 − β1
    beta2,
    beta2_weight,  # 1 − β2
    denominator_eps,  # ε·√bc2
    step_size,  # −lr·√bc2 / bc1
    W_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,  # float moments' dtype (not QUANTIZED)
    ALIGNED: tl.constexpr,
    APPLY_DECAY: tl.constexpr,
    FAITHFUL: tl.constexpr,
    RESET: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
    QUANTIZED: tl.constexpr,  # False: float32/bfloat16 moments; True: blockwise-quantized moments, with
    BITS: tl.constexpr,  # bits per code index,
    INDICES_PER_BYTE: tl.constexpr,  # 1 or 2 indices per byte,
    QBLOCK: tl.constexpr,  # and elements per absmax
    BLOCK: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
):
    """K3: n, μ, ν and the AdaGN factor (every program, from the snapshot), then the fused elementwise update."""
    pid = tl.program_id(0)
    n = _table_entry(TABLE, _T_NUMEL)
    programs = _programs(n, max_programs, BLOCK)
    if pid < programs:
        WS = _tensor(TABLE, _T_WORKSPACE, tl.float64, False, False)
        threshold, spike_factor, inv_scale, factor, m_weight, v_decay, eps_term = _step_scalars(
            TABLE,
            WS,
            programs,
            stride,
            norm_weight,
            norm_sq_weight,
            norm_bias_correction,
            norm_sq_bias_correction,
            eps,
            beta1_weight,
            beta2,
            denominator_eps,
            FAITHFUL,
            PARTIALS_BLOCK,
        )
        W = _tensor(TABLE, _T_PARAM, W_DTYPE, ALIGNED, MANUAL_BF16)
        G = _tensor(TABLE, _T_GRAD, G_DTYPE, ALIGNED, MANUAL_BF16)
        if not QUANTIZED:
            _update_float_moments(
                W, G, TABLE, pid, programs, n, decay, threshold, spike_factor, inv_scale, factor, m_weight, v_decay,
                beta2_weight, eps_term, step_size, W_DTYPE, G_DTYPE, M_DTYPE, ALIGNED, APPLY_DECAY, FAITHFUL, RESET,
                MANUAL_BF16, BLOCK,
            )  # fmt: skip
        else:
            _update_quantized_moments(
                W, G, TABLE, CODES_TABLE, pid, programs, n, decay, threshold, spike_factor, inv_scale, factor,
                m_weight, v_decay, beta2_weight, eps_term, step_size, W_DTYPE, G_DTYPE, ALIGNED, APPLY_DECAY,
                FAITHFUL, RESET, MANUAL_BF16, BITS, INDICES_PER_BYTE, QBLOCK, BLOCK,
            )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def num_programs(numel: int, block: int = DEFAULT_BLOCK, max_programs: int = DEFAULT_MAX_PROGRAMS) -> int:
    """The programs P each kernel runs for a tensor of ``numel`` elements (1 for an empty tensor)."""
    return max(1, min(-(-numel // block), max_programs))


def workspace_numel(numel: int, block: int = DEFAULT_BLOCK, max_programs: int = DEFAULT_MAX_PROGRAMS) -> int:
    """float64 elements of the workspace :func:`triton_update_tensor` needs for a tensor of ``numel`` elements."""
    return PARTIALS_OFFSET + 3 * num_programs(numel, block, max_programs)


def _unsupported_reason(param: Tensor, state: dict[str, Any], grad: Tensor | None) -> str | None:
    """Why the Triton step cannot handle this tensor (None when it can); metadata only, no device access."""
    if grad is None:
        return "the parameter has no gradient"
    device = param.device
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"device {device} (CUDA, or the CPU under TRITON_INTERPRET=1)"
    if param.dtype not in _PARAM_DTYPES:
        return f"parameter dtype {param.dtype} (float32, bfloat16 or float16)"
    if grad.is_sparse or grad.dtype not in _PARAM_DTYPES or grad.shape != param.shape or grad.device != device:
        return "a sparse gradient, or one of another dtype family, shape or device"
    if not param.is_contiguous():
        return "a non-contiguous parameter"
    if QUANTIZED_BITS in state:
        reason = _unsupported_quantized_reason(param, state, device)
    else:
        reason = _unsupported_moments_reason(param, state, device)
    if reason is not None:
        return reason
    for key in STATISTICS:
        stat = state.get(key)
        if not isinstance(stat, Tensor):
            return f"state[{key!r}] missing"
        if stat.dtype != torch.float64 or stat.numel() != 1 or stat.device != device:
            return f"state[{key!r}] must be a float64 scalar on the parameter's device"
    counter = state.get(NONFINITE_GRAD_STEPS)
    if not isinstance(counter, Tensor) or counter.dtype != torch.int64 or counter.numel() != 1:
        return f"state[{NONFINITE_GRAD_STEPS!r}] must be an int64 scalar"
    if counter.device != device:
        return f"state[{NONFINITE_GRAD_STEPS!r}] must be on the parameter's device"
    return None


def _quantized_layout_reason(bits: Any) -> str | None:
    """Why the update kernel cannot hold the quantized format ``bits`` (None when it can): it is a quantized row of
    ``STATE_FORMATS``, whose indices are packed one or two per byte and whose two moments share one block size (the
    kernel's [rows, QBLOCK/2, 2] element layout)."""
    fmt = STATE_FORMATS.get(bits) if isinstance(bits, int) else None
    if fmt is None or fmt.moment_formats is None:
        quantized = [b for b, f in STATE_FORMATS.items() if f.is_quantized]
        return f"quantized_bits {bits!r} (one of {quantized})"
    m_format, v_format = fmt.moment_formats
    if (m_format.bits, m_format.blocksize) != (v_format.bits, v_format.blocksize):
        return f"{bits}-bit moments with different index widths or block sizes"
    if m_format.indices_per_byte not in _INDICES_PER_BYTE:
        return f"{m_format.indices_per_byte} indices per byte (the kernel packs {_INDICES_PER_BYTE})"
    return None


def _unsupported_quantized_reason(param: Tensor, state: dict[str, Any], device: torch.device) -> str | None:
    """Checks of blockwise-quantized moments: the buffers (keys, dtypes, lengths) of the format's row of
    ``STATE_FORMATS``, the layout :func:`hf_gns_spam.optim.quantized_state.quantize` makes."""
    bits = state[QUANTIZED_BITS]
    reason = _quantized_layout_reason(bits)
    if reason is not None:
        return reason
    for buffer in STATE_FORMATS[bits].moment_buffers(param.numel(), torch.float32):
        tensor = state.get(buffer.key)
        if not isinstance(tensor, Tensor):
            return f"state[{buffer.key!r}] missing"
        if tensor.dtype != buffer.dtype or tensor.numel() != buffer.numel or tensor.device != device:
            return f"state[{buffer.key!r}] must be {buffer.numel} {buffer.dtype} values on the parameter's device"
        if not tensor.is_contiguous():
            return f"a non-contiguous state[{buffer.key!r}]"
    return None


def _unsupported_moments_reason(param: Tensor, state: dict[str, Any], device: torch.device) -> str | None:
    """Checks of float32/bfloat16 moments."""
    for key, _ in MOMENTS:
        moment = state.get(key)
        if not isinstance(moment, Tensor):
            return f"state[{key!r}] missing"
        if moment.dtype not in _MOMENT_DTYPES or moment.shape != param.shape or moment.device != device:
            return f"state[{key!r}] of dtype {moment.dtype} (float32 or bfloat16, parameter's shape and device)"
        if not moment.is_contiguous():
            return f"a non-contiguous state[{key!r}]"
    return None


def triton_update_supported(param: Tensor, state: dict[str, Any], grad: Tensor | None = None) -> bool:
    """Whether :func:`triton_update_tensor` can update ``param`` with this ``state`` (host metadata only);
    ``grad`` defaults to ``param.grad``."""
    return _unsupported_reason(param, state, param.grad if grad is None else grad) is None


def _bias_correction(decay: float, steps: int) -> float:
    """1 − decay^steps (as in :mod:`hf_gns_spam.optim.torch_step`)."""
    return 1.0 - decay**steps


_TABLES: dict[tuple[int, torch.device], Tensor] = {}


def _quantization_tables(fmt: StateFormat, device: torch.device) -> Tensor:
    """float32 [m's code, v's code, m's midpoints, v's midpoints], 2**bits entries each (a midpoint table's last
    entry is unused padding), on ``device``; built once per (bits, device). The midpoints are computed as
    :func:`hf_gns_spam.optim.quantized_state.quantize` computes them, ``(code[1:] + code[:-1]) / 2`` in float32."""
    bits = fmt.bits
    key = (bits, device)
    if key not in _TABLES:
        codes = [code_format.code(torch.device("cpu")) for code_format in fmt.moment_formats]
        for code in codes:
            if code.numel() != 2**bits:  # the binary search covers exactly 2**bits − 1 midpoints
                raise RuntimeError(f"a {bits}-bit code map with {code.numel()} values")
        midpoints = [torch.nn.functional.pad((code[1:] + code[:-1]) / 2, (0, 1), value=math.inf) for code in codes]
        _TABLES[key] = torch.cat(codes + midpoints).to(device)
    return _TABLES[key]


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_launch(param: Tensor, state: dict[str, Any], grad: Tensor, block: int, max_programs: int) -> None:
    reason = _unsupported_reason(param, state, grad)
    if reason is not None:
        raise ValueError(f"the fused Stable-SPAM step does not support this tensor: {reason}")
    if block < 16 or block & (block - 1) or max_programs < 1:
        raise ValueError(f"block must be a power of two ≥ 16 and max_programs ≥ 1, got {block}, {max_programs}")
    bits = state.get(QUANTIZED_BITS)
    if bits is not None:
        qblock = _quantization_block(STATE_FORMATS[bits])
        if block % qblock:
            raise ValueError(f"block must be a multiple of the {bits}-bit quantization block ({qblock}), got {block}")


def _quantization_block(fmt: StateFormat) -> int:
    """The block size both moments of a quantized format share (checked by :func:`_quantized_layout_reason`)."""
    return fmt.moment_formats[0].blocksize


def _check_workspace(workspace: Tensor, param: Tensor, programs: int, stride: int) -> None:
    if stride < programs:
        raise ValueError(f"stride {stride} is smaller than the {programs} programs")
    needed = PARTIALS_OFFSET + 3 * stride
    if workspace.dtype != torch.float64 or workspace.device != param.device or workspace.numel() < needed:
        raise ValueError(f"workspace must be float64 on {param.device} with at least {needed} elements")
    if not workspace.is_contiguous():
        raise ValueError("workspace must be contiguous")


#: The quantized moments' state keys in table order (columns 3–6): both index arrays, then both absmax arrays.
_QUANTIZED_TABLE_KEYS = tuple(key + suffix for suffix in (INDICES, ABSMAX) for key, _ in MOMENTS)


def _moment_tensors(state: dict[str, Any]) -> tuple[Tensor, ...]:
    """(m, v), or (m's indices, v's indices, m's absmax, v's absmax) for quantized moments: table columns 3–6."""
    if QUANTIZED_BITS in state:
        return tuple(state[key] for key in _QUANTIZED_TABLE_KEYS)
    return state[EXP_AVG], state[EXP_AVG_SQ]


@dataclass(frozen=True)
class _LaunchFormat:
    """What the tensors of one launch share: the device and the kernels' dtype constexprs. ``moments`` is the
    float moments' dtype or the quantized moments' bits; ``aligned``: every element array starts on 16 bytes."""

    device: torch.device
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    moments: torch.dtype | int
    aligned: bool


def _launch_format(param: Tensor, grad: Tensor, state: dict[str, Any], arrays: list[int]) -> _LaunchFormat:
    """The tensor's launch format; ``arrays`` are the addresses of its element arrays (parameter, gradient, moments)."""
    moments = state[QUANTIZED_BITS] if QUANTIZED_BITS in state else state[EXP_AVG].dtype
    aligned = all(address % 16 == 0 for address in arrays)
    return _LaunchFormat(param.device, param.dtype, grad.dtype, moments, aligned)


def _table_row(param: Tensor, grad: Tensor, state: dict[str, Any]) -> list[int]:
    """The tensor's row of the table (see ``_T_NUMEL`` … ``_T_WORKSPACE``), its workspace address still 0."""
    moments = [tensor.data_ptr() for tensor in _moment_tensors(state)]
    moments += [0] * (4 - len(moments))
    statistics = [state[key].data_ptr() for key in (*STATISTICS, NONFINITE_GRAD_STEPS)]
    return [param.numel(), grad.data_ptr(), param.data_ptr(), *moments, *statistics, 0]


def _element_arrays(row: list[int]) -> list[int]:
    """The addresses of a table row's element arrays (gradient, parameter, moments), which vector loads read."""
    return [address for address in row[_T_GRAD.value : _T_EXP_AVG_SQ_ABSMAX.value + 1] if address]


def _device_table(rows: list[list[int]], device: torch.device) -> Tensor:
    """The int64 table on ``device``, copied without waiting (from pinned memory) on CUDA."""
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table


@dataclass(frozen=True)
class _Launch:
    """One launch of each of the three kernels over ``count`` tensors that share a format, the hyperparameters and the
    step counters, described by ``table``."""

    table: Tensor
    count: int
    programs: int  # the grid's first dimension: the most programs any of the tensors uses
    stride: int
    format: _LaunchFormat
    hp: StepHyperparameters
    stat_step: int
    adam_step: int
    block: int
    max_programs: int

    def common(self) -> dict[str, Any]:
        return {
            "G_DTYPE": _TL_DTYPES[self.format.grad_dtype],
            "ALIGNED": self.format.aligned,
            "MANUAL_BF16": interpreting(),
            "BLOCK": self.block,
            "num_warps": _NUM_WARPS,
        }

    def max_abs(self) -> None:
        with _device_guard(self.format.device):
            _max_abs_kernel[(self.programs, self.count)](self.table, self.max_programs, self.stride, **self.common())

    def clip(self) -> None:
        hp = self.hp
        with _device_guard(self.format.device):
            _clipped_sumsq_kernel[(self.programs, self.count)](
                self.table,
                self.max_programs,
                self.stride,
                1.0 - hp.gamma3,
                _bias_correction(hp.gamma3, self.stat_step),
                PARTIALS_BLOCK=triton.next_power_of_2(self.max_programs),
                **self.common(),
            )

    def update(self) -> None:
        hp, stat_step, adam_step = self.hp, self.stat_step, self.adam_step
        sqrt_bc2 = math.sqrt(_bias_correction(hp.beta2, adam_step))
        moments = self.format.moments
        if isinstance(moments, int):
            fmt = STATE_FORMATS[moments]
            codes = _quantization_tables(fmt, self.format.device)
            constexprs = {
                "QUANTIZED": True,
                "BITS": fmt.moment_formats[0].bits,
                "INDICES_PER_BYTE": fmt.moment_formats[0].indices_per_byte,
                "QBLOCK": _quantization_block(fmt),
                "M_DTYPE": tl.float32,
            }
        else:
            codes = self.table
            constexprs = {
                "QUANTIZED": False,
                "BITS": 1,
                "INDICES_PER_BYTE": 1,
                "QBLOCK": 1,
                "M_DTYPE": _TL_DTYPES[moments],
            }
        with _device_guard(self.format.device):
            _update_kernel[(self.programs, self.count)](
                self.table,
                codes,
                self.max_programs,
                self.stride,
                1.0 - hp.lr * hp.weight_decay,
                1.0 - hp.gamma1,
                1.0 - hp.gamma2,
                _bias_correction(hp.gamma1, stat_step),
                _bias_correction(hp.gamma2, stat_step),
                hp.eps,
                1.0 - hp.beta1,
                hp.beta2,
                1.0 - hp.beta2,
                hp.eps * sqrt_bc2,
                -hp.lr * sqrt_bc2 / _bias_correction(hp.beta1, adam_step),
                W_DTYPE=_TL_DTYPES[self.format.param_dtype],
                APPLY_DECAY=hp.weight_decay != 0,
                FAITHFUL=hp.faithful,
                RESET=hp.is_reset_step,
                PARTIALS_BLOCK=triton.next_power_of_2(self.max_programs),
                **constexprs,
                **self.common(),
            )


@dataclass(frozen=True)
class StepTensor:
    """One tensor of a :class:`StepLaunches`: the parameter (updated in place), its gradient (contiguous), its state,
    the step's hyperparameters and counters, and its float64 workspace row (partials at ``stride`` intervals)."""

    param: Tensor
    grad: Tensor
    state: dict[str, Any]
    hp: StepHyperparameters
    stat_step: int
    adam_step: int
    workspace: Tensor


class StepLaunches:
    """The three kernels over many tensors, one launch of each per group of tensors that share their format,
    hyperparameters and step counters; :meth:`max_abs`, :meth:`clip` and :meth:`update` are K1, K2 and K3.

    A caller may work on the workspace rows between the kernels: the sharded step (FSDP2) reduces each row's pmax and
    pbad across the ranks after K1 and writes the global values back into every slot of pmax (pbad[0], the rest 0),
    and after K2 the same with the sum of pss in pss[0]. Each tensor is checked (:func:`triton_update_supported`'s
    checks, the workspace row's size) unless ``check`` is False because the caller has checked it.
    """

    def __init__(
        self,
        tensors: list[StepTensor],
        stride: int,
        *,
        block: int = DEFAULT_BLOCK,
        max_programs: int = DEFAULT_MAX_PROGRAMS,
        check: bool = True,
    ) -> None:
        groups: dict[tuple, list[tuple[StepTensor, list[int]]]] = {}
        for tensor in tensors:
            if check:
                _check_launch(tensor.param, tensor.state, tensor.grad, block, max_programs)
                _check_workspace(tensor.workspace, tensor.param, num_programs(tensor.param.numel(), block,
                                 max_programs), stride)  # fmt: skip
                if not tensor.grad.is_contiguous():
                    raise ValueError("StepLaunches needs contiguous gradients")
            row = _table_row(tensor.param, tensor.grad, tensor.state)
            row[_T_WORKSPACE.value] = tensor.workspace.data_ptr()
            launch_format = _launch_format(tensor.param, tensor.grad, tensor.state, _element_arrays(row))
            key = (launch_format, tensor.hp, tensor.stat_step, tensor.adam_step)
            groups.setdefault(key, []).append((tensor, row))
        self.params = [tensor.param for tensor in tensors]
        self.launches = []
        for (launch_format, hp, stat_step, adam_step), members in groups.items():
            programs = max(num_programs(row[_T_NUMEL.value], block, max_programs) for _, row in members)
            table = _device_table([row for _, row in members], launch_format.device)
            launch = _Launch(table, len(members), programs, stride, launch_format, hp, stat_step, adam_step, block,
                             max_programs)  # fmt: skip
            self.launches.append(launch)

    def max_abs(self) -> None:
        """K1: pmax, pbad (``workspace[8 : 8 + P]``, ``[8 + stride : …]``) and the statistics' snapshot."""
        for launch in self.launches:
            launch.max_abs()

    def clip(self) -> None:
        """K2: AdaClip (T and the non-finite counter in the state) and pss (``workspace[8 + 2·stride :]``), from the
        max|g| and non-finite count that pmax and pbad hold."""
        for launch in self.launches:
            launch.clip()

    def update(self) -> None:
        """K3: AdaGN (μ, ν in the state) from the Σ(g̃/s)² that pss holds, MoRet, Adam and the update."""
        for launch in self.launches:
            launch.update()
        _bump_versions(self.params)


def _bump_versions(params: list[Tensor]) -> None:
    """The kernels wrote the parameters behind autograd's back: bump their version counters as torch's in-place ops
    would (a graph that saved a parameter before the step then refuses to use the stale value). The optimizer's
    state never enters a graph."""
    torch.autograd.graph.increment_version(tuple(params))


def triton_update_tensor(
    param: Tensor,
    state: dict[str, Any],
    hp: StepHyperparameters,
    stat_step: int,
    adam_step: int,
    *,
    grad: Tensor | None = None,
    workspace: Tensor | None = None,
    block: int = DEFAULT_BLOCK,
    max_programs: int = DEFAULT_MAX_PROGRAMS,
) -> None:
    """One Stable-SPAM step of one tensor, in place, as ``stable_spam._update_tensor`` (formulas: module docstring).

    Args:
        param: the parameter; updated in place.
        state: its optimizer state; ``exp_avg``, ``exp_avg_sq`` (or, for 8/4-bit moments, ``exp_avg_q``,
            ``exp_avg_absmax``, ``exp_avg_sq_q`` and ``exp_avg_sq_absmax``), ``clip_max_ema``, ``norm_ema``,
            ``norm_sq_ema`` and ``nonfinite_grad_steps`` are updated in place (``state["step"]``, faithful mode's
            counter, is the caller's business).
        hp: the group's hyperparameters at this step, s(t) already applied to β1 and γ1.
        stat_step: k of the AdaClip and AdaGN bias corrections.
        adam_step: the step of Adam's bias corrections.
        grad: the gradient (read, never written); ``param.grad`` when None.
        workspace: optional float64 buffer on the parameter's device with at least :func:`workspace_numel` elements,
            reused across calls to avoid an allocation; its contents are overwritten.
        block: elements per block, a power of two (tests use small blocks to cover several blocks per program); a
            multiple of the quantization block (256 at 8 bits, 128 at 4) for quantized moments.
        max_programs: the most programs per kernel (and partial results per reduction).

    Raises:
        ValueError: the tensor is not supported (see :func:`triton_update_supported`), or a bad workspace/launch
            setting. Nothing is read back from the device.
    """
    grad = param.grad if grad is None else grad
    _check_launch(param, state, grad, block, max_programs)
    programs = num_programs(param.numel(), block, max_programs)
    if workspace is None:
        workspace = torch.empty(PARTIALS_OFFSET + 3 * programs, dtype=torch.float64, device=param.device)
    _check_workspace(workspace, param, programs, programs)
    grad = grad if grad.is_contiguous() else grad.contiguous()
    tensor = StepTensor(param, grad, state, hp, stat_step, adam_step, workspace)
    launches = StepLaunches([tensor], programs, block=block, max_programs=max_programs, check=False)
    launches.max_abs()
    launches.clip()
    launches.update()


def triton_update_tensors(
    params: list[Tensor],
    states: list[dict[str, Any]],
    hp: StepHyperparameters,
    stat_step: int,
    adam_step: int,
    *,
    grads: list[Tensor] | None = None,
    block: int = DEFAULT_BLOCK,
    max_programs: int = DEFAULT_MAX_PROGRAMS,
    check: bool = True,
) -> None:
    """One Stable-SPAM step of several tensors that share ``hp`` and the step counters, in three launches per format.

    Each tensor is updated exactly as :func:`triton_update_tensor` would update it alone (bitwise: its programs,
    blocks and reductions do not depend on the other tensors). Tensors are grouped by device, parameter, gradient
    and moment dtypes (or quantized bits) and 16-byte alignment; each group is one launch of each kernel over a
    table of its tensors (grid: programs × tensors), so the host cost is that of three launches per group instead of
    three per tensor. Arguments as :func:`triton_update_tensor`; ``grads`` defaults to the parameters' ``.grad``;
    ``check=False`` skips the per-tensor checks when the caller has made them (:func:`triton_update_supported`).
    """
    grads = [param.grad for param in params] if grads is None else list(grads)
    if not len(params) == len(states) == len(grads):
        raise ValueError(f"{len(params)} parameters, {len(states)} states and {len(grads)} gradients")
    if check:
        for param, state, grad in zip(params, states, grads, strict=True):
            _check_launch(param, state, grad, block, max_programs)
    grads = [grad if grad.is_contiguous() else grad.contiguous() for grad in grads]
    stride = max((num_programs(param.numel(), block, max_programs) for param in params), default=1)
    by_device: dict[torch.device, list[int]] = {}
    for index, param in enumerate(params):
        by_device.setdefault(param.device, []).append(index)
    tensors = []
    for device, indices in by_device.items():
        workspace = torch.empty(len(indices), PARTIALS_OFFSET + 3 * stride, dtype=torch.float64, device=device)
        tensors += [
            StepTensor(params[i], grads[i], states[i], hp, stat_step, adam_step, row)
            for i, row in zip(indices, workspace.unbind(), strict=True)
        ]
    launches = StepLaunches(tensors, stride, block=block, max_programs=max_programs, check=False)
    launches.max_abs()
    launches.clip()
    launches.update()
