"""Fused Triton step of the Stable-SPAM optimizer for one parameter tensor.

:func:`triton_update_tensor` computes exactly what :func:`hf_gns_spam.optim.stable_spam._update_tensor` computes
(same state layout, same formulas, same float32 roundings where it matters), in three passes over memory instead of
about a dozen torch kernels. For a tensor W with gradient g at AdaClip/AdaGN step k and Adam step a, all in float32:

1. decoupled weight decay ``W ← W·(1 − lr·wd)``, rounded to W's dtype (as torch's in-place ``mul_``);
2. AdaClip: ``T ← lerp(T, max|g|, 1 − γ3)``, ``T̂ = T / (1 − γ3^k)``,
   ``g̃_i = g_i · (T̂ / max|g|)`` where ``|g_i| > T̂``, else ``g_i``;
3. AdaGN: ``n = √Σg̃²``, ``μ ← lerp(μ, n, w1)``, ``ν ← lerp(ν, n·n, w2)``,
   ``s = (μ / (1 − γ1^k)) / (√(ν / (1 − γ2^k)) + ε)``, ``ĝ = g̃ · (s / n)`` (``ĝ = g̃`` when n = 0);
   faithful: ``w1 = 1 − γ1``, ``w2 = 1 − γ2``; clean: the same times ``[n > 0]`` (a zero-norm tensor keeps μ, ν);
4. MoRet: clean mode reads m = v = 0 on a reset step (a fresh first Adam step); faithful mode updates with the old
   moments and stores m = v = 0 afterwards;
5. Adam: ``m ← lerp(m, ĝ, 1 − β1)``, ``v ← β2·v + (1 − β2)·ĝ·ĝ``,
   ``W ← W + (−lr·√bc2/bc1)·m / (√v + ε·√bc2)`` with ``bc1 = 1 − β1^a``, ``bc2 = 1 − β2^a``; in clean mode a
   zero-norm tensor uses weight 0 for m, decay 1 for v and an infinite denominator, so m, v and W stay as they are
   (weight decay still applies). Moments are loaded and updated in float32 and stored in their own dtype (float32,
   or bfloat16 rounded to nearest even for ``state_bits=16``); W is stored in its dtype.

``lerp(a, b, w)`` is torch's: ``a + w·(b − a)`` for ``|w| < 0.5``, else ``b − (b − a)·(1 − w)``. Divisions and
square roots are IEEE-rounded (``div_rn``, ``sqrt_rn``), as in torch.

Kernel plan (no host synchronisation: the per-tensor scalars live in a small float32 workspace on the device). The
tensor is a flat contiguous array of n elements cut into blocks of ``BLOCK`` elements; each kernel runs
``P = min(⌈n / BLOCK⌉, max_programs)`` programs, program p handling blocks p, p + P, p + 2P, … (a grid-stride loop),
so every partial-result buffer has at most ``max_programs`` entries::

    K1 _max_abs_kernel:        pmax[p] = max |g| over p's blocks (NaN-propagating, like torch.amax);
                               program 0 snapshots T, μ, ν into the workspace.
    K2 _clipped_sumsq_kernel:  every program reduces pmax[0:P] → max|g| (same order in every program, so the same
                               value), computes T, T̂ and T̂/max|g| from the snapshot; pss[p] = Σ g̃² over p's blocks;
                               program 0 writes T to the state and T̂, T̂/max|g| to the workspace.
    K3 _update_kernel:         every program reduces pss[0:P] → n, computes μ, ν and the AdaGN factor s/n from the
                               snapshot; program 0 writes μ, ν to the state; then the fused elementwise pass
                               (weight decay, clip, AdaGN scale, MoRet, Adam moments, parameter update, stores).

The snapshot makes the in-place scalar updates race-free: within a kernel the programs read the old statistics from
the workspace while program 0 overwrites the state tensors. The reductions are two-stage with a launch
configuration that depends only on n, ``BLOCK`` and ``max_programs``, so results are bitwise deterministic (no
atomics). Under the Triton interpreter (CPU tests) the float32 → bfloat16 stores round to nearest even on the bits,
because the interpreter's own conversion truncates.

Requirements (checked on the host from metadata only): parameter and moments contiguous; parameter of dtype
float32, bfloat16 or float16 (float64 parameters, whose compute dtype is float64, are not supported); gradient of one
of those dtypes (a non-contiguous gradient is copied); moments float32 or bfloat16, or blockwise-quantized
(``quantized_bits`` 8 or 4, the layout of :mod:`hf_gns_spam.optim.quantized_state`); the three statistics 0-dim
float32 tensors; everything on one CUDA device (or on the CPU under ``TRITON_INTERPRET=1``).

Quantized moments (K3 is then ``_update_quantized_kernel``): BLOCK must be a multiple of the quantization block
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
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from hf_gns_spam.kernels.rounding import cast, interpreting
from hf_gns_spam.optim.quantized_state import moment_format
from hf_gns_spam.optim.stable_spam import _StepHyperparameters

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_MAX_PROGRAMS",
    "triton_update_supported",
    "triton_update_tensor",
    "workspace_numel",
]

#: Elements per block (one iteration of a program's loop); 8 warps → 8 float32 per thread.
DEFAULT_BLOCK = 2048
_NUM_WARPS = 8
#: Upper bound on the programs of each kernel (about one wave of 8-warp programs on an H100's 132 SMs); also the
#: size of the partial-result buffers that every program of the next kernel reduces.
DEFAULT_MAX_PROGRAMS = 1024

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MOMENT_DTYPES = (torch.float32, torch.bfloat16)
_STAT_KEYS = ("clip_max_ema", "norm_ema", "norm_sq_ema")

# Workspace layout (float32): snapshot of the statistics, the AdaClip scalars, then the two partial buffers.
# (tl.constexpr: the only kind of global a kernel may read when compiled.)
_WS_CLIP_EMA = tl.constexpr(0)  # T before the step
_WS_NORM_EMA = tl.constexpr(1)  # μ before the step
_WS_NORM_SQ_EMA = tl.constexpr(2)  # ν before the step
_WS_THRESHOLD = tl.constexpr(3)  # T̂
_WS_RATIO = tl.constexpr(4)  # T̂ / max|g|
_WS_PARTIALS = tl.constexpr(8)  # pmax[0:P], then pss[0:P]


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _nan_max(a, b):
    """max(a, b), NaN if either is NaN (torch.amax's behaviour)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nan_max_reduce(x):
    """max over a 1-D block, NaN if any entry is NaN (tl.max alone drops NaNs; a custom tl.reduce combine is slow
    under the interpreter)."""
    has_nan = tl.max((x != x).to(tl.int32), 0) > 0
    return tl.where(has_nan, float("nan"), tl.max(x, 0))


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula: ``start + w·(end − start)`` for ``|w| < 0.5``, else ``end − (end − start)·(1 − w)``."""
    return tl.where(tl.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _max_abs_kernel(
    G,
    WS,
    CLIP_EMA,
    NORM_EMA,
    NORM_SQ_EMA,
    n,
    num_programs,
    BLOCK: tl.constexpr,
):
    """K1: ``pmax[p] = max |g|`` over program p's blocks; program 0 snapshots T, μ, ν into the workspace."""
    pid = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, num_programs * BLOCK):
        idx = start + offsets
        g = tl.load(G + idx, mask=idx < n, other=0.0).to(tl.float32)
        acc = _nan_max(acc, tl.abs(g))
    tl.store(WS + _WS_PARTIALS + pid, _nan_max_reduce(acc))
    if pid == 0:
        tl.store(WS + _WS_CLIP_EMA, tl.load(CLIP_EMA))
        tl.store(WS + _WS_NORM_EMA, tl.load(NORM_EMA))
        tl.store(WS + _WS_NORM_SQ_EMA, tl.load(NORM_SQ_EMA))


@triton.jit
def _clipped_sumsq_kernel(
    G,
    WS,
    CLIP_EMA,
    n,
    num_programs,
    clip_weight,  # 1 − γ3
    clip_bias_correction,  # 1 − γ3^k
    BLOCK: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
):
    """K2: max|g|, T, T̂ and T̂/max|g| (every program, from the snapshot); ``pss[p] = Σ g̃²`` over p's blocks."""
    pid = tl.program_id(0)
    partial_offsets = tl.arange(0, PARTIALS_BLOCK)
    partials = tl.load(WS + _WS_PARTIALS + partial_offsets, mask=partial_offsets < num_programs, other=0.0)
    grad_max = _nan_max_reduce(partials)
    clip_max_ema = _lerp(tl.load(WS + _WS_CLIP_EMA), grad_max, clip_weight)
    threshold = tl.div_rn(clip_max_ema, clip_bias_correction)
    # inf or nan only when max|g| = 0, and then no entry exceeds the threshold
    ratio = tl.div_rn(threshold, grad_max)

    offsets = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, num_programs * BLOCK):
        idx = start + offsets
        g = tl.load(G + idx, mask=idx < n, other=0.0).to(tl.float32)
        clipped = tl.where(tl.abs(g) > threshold, g * ratio, g)
        acc += clipped * clipped
    tl.store(WS + _WS_PARTIALS + num_programs + pid, tl.sum(acc, 0))
    if pid == 0:
        tl.store(CLIP_EMA, clip_max_ema)
        tl.store(WS + _WS_THRESHOLD, threshold)
        tl.store(WS + _WS_RATIO, ratio)


@triton.jit
def _step_scalars(
    WS,
    NORM_EMA,
    NORM_SQ_EMA,
    num_programs,
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
    """K3's prologue: n from pss[0:P], μ and ν (program 0 stores them), the AdaGN factor s/n, the clip threshold
    and ratio, and the Adam weights of this step (a clean-mode zero-norm tensor gets the "keep everything" ones).

    Returns (T̂, T̂/max|g|, s/n, weight of m's EMA, decay of v, ε term of the denominator)."""
    pid = tl.program_id(0)
    partial_offsets = tl.arange(0, PARTIALS_BLOCK)
    partials = tl.load(
        WS + _WS_PARTIALS + num_programs + partial_offsets, mask=partial_offsets < num_programs, other=0.0
    )
    norm = tl.sqrt_rn(tl.sum(partials, 0))
    has_norm = norm > 0
    active = has_norm.to(tl.float32)
    if FAITHFUL:
        norm_ema = _lerp(tl.load(WS + _WS_NORM_EMA), norm, norm_weight)
        norm_sq_ema = _lerp(tl.load(WS + _WS_NORM_SQ_EMA), norm * norm, norm_sq_weight)
    else:  # clean: a zero-norm tensor keeps its statistics (EMA weight 0)
        norm_ema = _lerp(tl.load(WS + _WS_NORM_EMA), norm, active * norm_weight)
        norm_sq_ema = _lerp(tl.load(WS + _WS_NORM_SQ_EMA), norm * norm, active * norm_sq_weight)
    norm_sq_ema_hat_sqrt = tl.sqrt_rn(tl.div_rn(norm_sq_ema, norm_sq_bias_correction))
    adagn_scale = tl.div_rn(tl.div_rn(norm_ema, norm_bias_correction), norm_sq_ema_hat_sqrt + eps)
    scale = tl.where(has_norm, tl.div_rn(adagn_scale, tl.where(has_norm, norm, 1.0)), 1.0)
    if pid == 0:
        tl.store(NORM_EMA, norm_ema)
        tl.store(NORM_SQ_EMA, norm_sq_ema)
    threshold = tl.load(WS + _WS_THRESHOLD)
    ratio = tl.load(WS + _WS_RATIO)
    if FAITHFUL:
        m_weight = beta1_weight
        v_decay = beta2
        eps_term = denominator_eps
    else:  # a skipped tensor keeps m and v (ĝ is 0: EMA weight 0, decay 1) and gets an infinite denominator
        m_weight = active * beta1_weight
        v_decay = tl.where(has_norm, beta2, 1.0)
        eps_term = tl.where(has_norm, denominator_eps, float("inf"))
    return threshold, ratio, scale, m_weight, v_decay, eps_term


@triton.jit
def _adam_elementwise(w, g, m, v, threshold, ratio, scale, m_weight, v_decay, beta2_weight, eps_term, step_size):
    """Clip, AdaGN scale (ĝ), Adam's moments and the parameter update, all float32; returns (W, m, v)."""
    update = tl.where(tl.abs(g) > threshold, g * ratio, g) * scale  # ĝ
    m = _lerp(m, update, m_weight)
    v = v * v_decay + beta2_weight * update * update
    denominator = tl.sqrt_rn(v) + eps_term
    w = w + tl.div_rn(step_size * m, denominator)
    return w, m, v


@triton.jit
def _update_kernel(
    W,
    G,
    M,
    V,
    WS,
    NORM_EMA,
    NORM_SQ_EMA,
    n,
    num_programs,
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
    APPLY_DECAY: tl.constexpr,
    FAITHFUL: tl.constexpr,
    RESET: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
):
    """K3: n, μ, ν and the AdaGN factor (every program, from the snapshot), then the fused elementwise update."""
    pid = tl.program_id(0)
    threshold, ratio, scale, m_weight, v_decay, eps_term = _step_scalars(
        WS,
        NORM_EMA,
        NORM_SQ_EMA,
        num_programs,
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
    offsets = tl.arange(0, BLOCK)
    for start in range(pid * BLOCK, n, num_programs * BLOCK):
        idx = start + offsets
        mask = idx < n
        w = tl.load(W + idx, mask=mask, other=0.0).to(tl.float32)
        if APPLY_DECAY:  # torch's in-place mul_ rounds to W's dtype before the update
            w = cast(w * decay, W.dtype.element_ty, MANUAL_BF16).to(tl.float32)
        g = tl.load(G + idx, mask=mask, other=0.0).to(tl.float32)
        if RESET and not FAITHFUL:  # clean MoRet: zero moments before the update
            m = tl.zeros([BLOCK], dtype=tl.float32)
            v = tl.zeros([BLOCK], dtype=tl.float32)
        else:
            m = tl.load(M + idx, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(V + idx, mask=mask, other=0.0).to(tl.float32)
        w, m, v = _adam_elementwise(
            w, g, m, v, threshold, ratio, scale, m_weight, v_decay, beta2_weight, eps_term, step_size
        )
        tl.store(W + idx, cast(w, W.dtype.element_ty, MANUAL_BF16), mask=mask)
        if RESET and FAITHFUL:  # faithful MoRet: the update used the old moments; zero them now
            m = tl.zeros([BLOCK], dtype=tl.float32)
            v = tl.zeros([BLOCK], dtype=tl.float32)
        tl.store(M + idx, cast(m, M.dtype.element_ty, MANUAL_BF16), mask=mask)
        tl.store(V + idx, cast(v, V.dtype.element_ty, MANUAL_BF16), mask=mask)


@triton.jit
def _dequantize(Q, ABSMAX, CODE, rows, idx, mask, pairs, n, BITS: tl.constexpr, QBLOCK: tl.constexpr):
    """float32 values ``code[index]·absmax`` of the elements ``idx`` ([ROWS, QBLOCK/2, 2], row r = quantization
    block ``rows[r]``; ``pairs`` [ROWS, QBLOCK/2] are the byte offsets of 4-bit index pairs); 0 where masked."""
    absmax = tl.load(ABSMAX + rows, mask=rows * QBLOCK < n, other=0.0)
    if BITS == 8:
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
def _store_quantized(Q, ABSMAX, index, absmax, rows, idx, mask, pairs, n, BITS: tl.constexpr, QBLOCK: tl.constexpr):
    """Store the indices (4 bits: packed in pairs, a missing odd last element as index 0) and the absmax."""
    tl.store(ABSMAX + rows, absmax, mask=rows * QBLOCK < n)
    if BITS == 8:
        tl.store(Q + idx, index.to(tl.uint8), mask=mask)
    else:
        high, low = tl.split(tl.where(mask, index, 0))
        tl.store(Q + pairs, ((high << 4) | low).to(tl.uint8), mask=pairs * 2 < n)


@triton.jit
def _update_quantized_kernel(
    W,
    G,
    M_Q,
    M_ABSMAX,
    V_Q,
    V_ABSMAX,
    TABLES,  # float32: m's code, v's code, m's midpoints, v's midpoints (2^BITS entries each)
    WS,
    NORM_EMA,
    NORM_SQ_EMA,
    n,
    num_programs,
    decay,
    norm_weight,
    norm_sq_weight,
    norm_bias_correction,
    norm_sq_bias_correction,
    eps,
    beta1_weight,
    beta2,
    beta2_weight,
    denominator_eps,
    step_size,
    APPLY_DECAY: tl.constexpr,
    FAITHFUL: tl.constexpr,
    RESET: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
    BITS: tl.constexpr,
    QBLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
):
    """K3 for blockwise-quantized moments: as :func:`_update_kernel`, with the moments dequantized from (index,
    absmax) in registers and requantized after the update. A program's block of BLOCK elements is BLOCK/QBLOCK whole
    quantization blocks, laid out as [rows, QBLOCK/2, 2] (element pairs, for the 4-bit packing)."""
    pid = tl.program_id(0)
    threshold, ratio, scale, m_weight, v_decay, eps_term = _step_scalars(
        WS,
        NORM_EMA,
        NORM_SQ_EMA,
        num_programs,
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
    ROWS: tl.constexpr = BLOCK // QBLOCK
    HALF: tl.constexpr = QBLOCK // 2
    CODES: tl.constexpr = 1 << BITS
    row_offsets = tl.arange(0, ROWS)
    pair_offsets = tl.arange(0, HALF)
    in_row = tl.join(pair_offsets * 2, pair_offsets * 2 + 1)  # [HALF, 2]: element offsets within a row
    for start in range(pid * BLOCK, n, num_programs * BLOCK):
        rows = start // QBLOCK + row_offsets
        idx = rows[:, None, None] * QBLOCK + in_row[None, :, :]
        pairs = rows[:, None] * HALF + pair_offsets[None, :]
        mask = idx < n
        w = tl.load(W + idx, mask=mask, other=0.0).to(tl.float32)
        if APPLY_DECAY:
            w = cast(w * decay, W.dtype.element_ty, MANUAL_BF16).to(tl.float32)
        g = tl.load(G + idx, mask=mask, other=0.0).to(tl.float32)
        if RESET and not FAITHFUL:
            m = tl.zeros([ROWS, HALF, 2], dtype=tl.float32)
            v = tl.zeros([ROWS, HALF, 2], dtype=tl.float32)
        else:
            m = _dequantize(M_Q, M_ABSMAX, TABLES, rows, idx, mask, pairs, n, BITS, QBLOCK)
            v = _dequantize(V_Q, V_ABSMAX, TABLES + CODES, rows, idx, mask, pairs, n, BITS, QBLOCK)
        w, m, v = _adam_elementwise(
            w, g, m, v, threshold, ratio, scale, m_weight, v_decay, beta2_weight, eps_term, step_size
        )
        tl.store(W + idx, cast(w, W.dtype.element_ty, MANUAL_BF16), mask=mask)
        if RESET and FAITHFUL:
            m = tl.zeros([ROWS, HALF, 2], dtype=tl.float32)
            v = tl.zeros([ROWS, HALF, 2], dtype=tl.float32)
        else:  # elements beyond the tensor are quantize's zero padding (ĝ = 0·s/n is NaN there if s/n is)
            m = tl.where(mask, m, 0.0)
            v = tl.where(mask, v, 0.0)
        m_index, m_absmax = _quantize(m, TABLES + 2 * CODES, BITS)
        _store_quantized(M_Q, M_ABSMAX, m_index, m_absmax, rows, idx, mask, pairs, n, BITS, QBLOCK)
        v_index, v_absmax = _quantize(v, TABLES + 3 * CODES, BITS)
        _store_quantized(V_Q, V_ABSMAX, v_index, v_absmax, rows, idx, mask, pairs, n, BITS, QBLOCK)


# --------------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------------


def _num_programs(numel: int, block: int, max_programs: int) -> int:
    return max(1, min(triton.cdiv(numel, block), max_programs))


def workspace_numel(numel: int, block: int = DEFAULT_BLOCK, max_programs: int = DEFAULT_MAX_PROGRAMS) -> int:
    """float32 elements of the workspace :func:`triton_update_tensor` needs for a tensor of ``numel`` elements."""
    return _WS_PARTIALS.value + 2 * _num_programs(numel, block, max_programs)


def _unsupported_reason(param: Tensor, state: dict[str, Any]) -> str | None:
    """Why the Triton step cannot handle this tensor (None when it can); metadata only, no device access."""
    if param.grad is None:
        return "the parameter has no gradient"
    if param.device.type != "cuda" and not (param.device.type == "cpu" and interpreting()):
        return f"device {param.device} (CUDA, or the CPU under TRITON_INTERPRET=1)"
    if param.dtype not in _PARAM_DTYPES:
        return f"parameter dtype {param.dtype} (float32, bfloat16 or float16)"
    grad = param.grad
    if grad.is_sparse or grad.dtype not in _PARAM_DTYPES or grad.shape != param.shape or grad.device != param.device:
        return "a sparse gradient, or one of another dtype family, shape or device"
    if not param.is_contiguous():
        return "a non-contiguous parameter"
    if "quantized_bits" in state:
        reason = _unsupported_quantized_reason(param, state)
        if reason is not None:
            return reason
    else:
        reason = _unsupported_moments_reason(param, state)
        if reason is not None:
            return reason
    for key in _STAT_KEYS:
        stat = state.get(key)
        if not isinstance(stat, Tensor):
            return f"state[{key!r}] missing"
        if stat.dtype != torch.float32 or stat.numel() != 1 or stat.device != param.device:
            return f"state[{key!r}] must be a float32 scalar on the parameter's device"
    return None


def _unsupported_quantized_reason(param: Tensor, state: dict[str, Any]) -> str | None:
    """Checks of blockwise-quantized moments: the layout :func:`hf_gns_spam.optim.quantized_state.quantize` makes."""
    bits = state["quantized_bits"]
    if bits not in (8, 4):
        return f"quantized_bits {bits!r} (8 or 4)"
    numel = param.numel()
    for key, second_moment in (("exp_avg", False), ("exp_avg_sq", True)):
        blocksize = moment_format(bits, second_moment).blocksize
        for suffix, dtype, size in (
            ("_q", torch.uint8, numel if bits == 8 else (numel + 1) // 2),
            ("_absmax", torch.float32, triton.cdiv(numel, blocksize)),
        ):
            tensor = state.get(key + suffix)
            if not isinstance(tensor, Tensor):
                return f"state[{key + suffix!r}] missing"
            if tensor.dtype != dtype or tensor.numel() != size or tensor.device != param.device:
                return f"state[{key + suffix!r}] must be {size} {dtype} values on the parameter's device"
            if not tensor.is_contiguous():
                return f"a non-contiguous state[{key + suffix!r}]"
    return None


def _unsupported_moments_reason(param: Tensor, state: dict[str, Any]) -> str | None:
    """Checks of float32/bfloat16 moments."""
    for key in ("exp_avg", "exp_avg_sq"):
        moment = state.get(key)
        if not isinstance(moment, Tensor):
            return f"state[{key!r}] missing"
        if moment.dtype not in _MOMENT_DTYPES or moment.shape != param.shape or moment.device != param.device:
            return f"state[{key!r}] of dtype {moment.dtype} (float32 or bfloat16, parameter's shape and device)"
        if not moment.is_contiguous():
            return f"a non-contiguous state[{key!r}]"
    return None


def triton_update_supported(param: Tensor, state: dict[str, Any]) -> bool:
    """Whether :func:`triton_update_tensor` can update ``param`` with this ``state`` (host metadata only)."""
    return _unsupported_reason(param, state) is None


def _bias_correction(decay: float, steps: int) -> float:
    """1 − decay^steps (as in :mod:`hf_gns_spam.optim.stable_spam`)."""
    return 1.0 - decay**steps


_TABLES: dict[tuple[int, torch.device], Tensor] = {}


def _quantization_tables(bits: int, device: torch.device) -> Tensor:
    """float32 [m's code, v's code, m's midpoints, v's midpoints], 2**bits entries each (a midpoint table's last
    entry is unused padding), on ``device``; built once per (bits, device). The midpoints are computed as
    :func:`hf_gns_spam.optim.quantized_state.quantize` computes them, ``(code[1:] + code[:-1]) / 2`` in float32."""
    key = (bits, device)
    if key not in _TABLES:
        codes = [moment_format(bits, second_moment).code(torch.device("cpu")) for second_moment in (False, True)]
        for code in codes:
            if code.numel() != 2**bits:  # the binary search covers exactly 2**bits − 1 midpoints
                raise RuntimeError(f"a {bits}-bit code map with {code.numel()} values")
        midpoints = [torch.nn.functional.pad((code[1:] + code[:-1]) / 2, (0, 1), value=math.inf) for code in codes]
        _TABLES[key] = torch.cat(codes + midpoints).to(device)
    return _TABLES[key]


def triton_update_tensor(
    param: Tensor,
    state: dict[str, Any],
    hp: _StepHyperparameters,
    stat_step: int,
    adam_step: int,
    *,
    workspace: Tensor | None = None,
    block: int = DEFAULT_BLOCK,
    max_programs: int = DEFAULT_MAX_PROGRAMS,
) -> None:
    """One Stable-SPAM step of one tensor, in place, as ``stable_spam._update_tensor`` (formulas: module docstring).

    Args:
        param: the parameter (its ``.grad`` is read, never written); updated in place.
        state: its optimizer state; ``exp_avg``, ``exp_avg_sq`` (or, for 8/4-bit moments, ``exp_avg_q``,
            ``exp_avg_absmax``, ``exp_avg_sq_q`` and ``exp_avg_sq_absmax``), ``clip_max_ema``, ``norm_ema`` and
            ``norm_sq_ema`` are updated in place (``state["step"]``, faithful mode's counter, is the caller's business).
        hp: the group's hyperparameters at this step, s(t) already applied to β1 and γ1.
        stat_step: k of the AdaClip and AdaGN bias corrections.
        adam_step: the step of Adam's bias corrections.
        workspace: optional float32 buffer on the parameter's device with at least :func:`workspace_numel` elements,
            reused across calls to avoid an allocation; its contents are overwritten.
        block: elements per block, a power of two (tests use small blocks to cover several blocks per program); a
            multiple of the quantization block (256 at 8 bits, 128 at 4) for quantized moments.
        max_programs: the most programs per kernel (and partial results per reduction).

    Raises:
        ValueError: the tensor is not supported (see :func:`triton_update_supported`), or a bad workspace/launch
            setting. Nothing is read back from the device.
    """
    reason = _unsupported_reason(param, state)
    if reason is not None:
        raise ValueError(f"triton_update_tensor does not support this tensor: {reason}")
    if block < 16 or block & (block - 1) or max_programs < 1:
        raise ValueError(f"block must be a power of two ≥ 16 and max_programs ≥ 1, got {block}, {max_programs}")
    bits = state.get("quantized_bits")
    if bits is not None:
        qblock = moment_format(bits, False).blocksize
        if moment_format(bits, True).blocksize != qblock:  # one layout for both moments
            raise ValueError(f"{bits}-bit moments with different block sizes")
        if block % qblock:
            raise ValueError(f"block must be a multiple of the {bits}-bit quantization block ({qblock}), got {block}")
    numel = param.numel()
    num_programs = _num_programs(numel, block, max_programs)
    needed = _WS_PARTIALS.value + 2 * num_programs
    if workspace is None:
        workspace = torch.empty(needed, dtype=torch.float32, device=param.device)
    elif workspace.dtype != torch.float32 or workspace.device != param.device or workspace.numel() < needed:
        raise ValueError(f"workspace must be float32 on {param.device} with at least {needed} elements")
    elif not workspace.is_contiguous():
        raise ValueError("workspace must be contiguous")

    grad = param.grad if param.grad.is_contiguous() else param.grad.contiguous()
    if bits is None:
        moments: tuple[Tensor, ...] = (state["exp_avg"], state["exp_avg_sq"])
    else:
        keys = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")
        moments = (*(state[key] for key in keys), _quantization_tables(bits, param.device))
    clip_max_ema, norm_ema, norm_sq_ema = (state[key] for key in _STAT_KEYS)
    partials_block = triton.next_power_of_2(num_programs)
    sqrt_bc2 = math.sqrt(_bias_correction(hp.beta2, adam_step))
    grid = (num_programs,)
    device_guard = torch.cuda.device(param.device) if param.is_cuda else contextlib.nullcontext()
    with device_guard:
        _max_abs_kernel[grid](
            grad, workspace, clip_max_ema, norm_ema, norm_sq_ema, numel, num_programs, BLOCK=block, num_warps=_NUM_WARPS
        )
        _clipped_sumsq_kernel[grid](
            grad,
            workspace,
            clip_max_ema,
            numel,
            num_programs,
            1.0 - hp.gamma3,
            _bias_correction(hp.gamma3, stat_step),
            BLOCK=block,
            PARTIALS_BLOCK=partials_block,
            num_warps=_NUM_WARPS,
        )
        update_kernel = _update_kernel if bits is None else _update_quantized_kernel
        quantized = {} if bits is None else {"BITS": bits, "QBLOCK": qblock}
        update_kernel[grid](
            param,
            grad,
            *moments,
            workspace,
            norm_ema,
            norm_sq_ema,
            numel,
            num_programs,
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
            APPLY_DECAY=hp.weight_decay != 0,
            FAITHFUL=hp.faithful,
            RESET=hp.is_reset_step,
            MANUAL_BF16=interpreting(),
            **quantized,
            BLOCK=block,
            PARTIALS_BLOCK=partials_block,
            num_warps=_NUM_WARPS,
        )
    # The kernels wrote behind autograd's back: bump the version counters as torch's in-place ops would.
    written = moments if bits is None else moments[:4]
    torch.autograd.graph.increment_version((param, *written, clip_max_ema, norm_ema, norm_sq_ema))
