"""Fused Triton forward and backward of a normalization layer that also returns per-example gradient statistics.

The contract, the maths and every rounding are those of the pure-torch reference
:mod:`hf_gns_spam.ops.norm_reference`; these kernels compute the same thing in fewer passes over memory.

Shapes: ``x`` is viewed as ``[N, D]`` rows, ``N = B·R``: B examples (dimension 0), R rows per example (the product
of the middle dimensions, 1 for a ``[B, D]`` input), D features. Rows ``b·R … b·R + R − 1`` belong to example b.

Forward (one program per ``BLOCK_ROWS`` rows), per row in float32 (``offset`` is 1 for Gemma's ``(1 + w)``)::

    layer_norm: μ = Σx / D,  r = 1/√(Σ(x − μ)² / D + eps),  x̂ = (x − μ)·r
    rms_norm:   μ = 0,       r = 1/√(Σx² / D + eps),        x̂ = x·r
    AFFINE SCALE_SHIFT ("float32_product"):                     y = x̂ ⊙ (offset + w) + b   (float32, then cast)
    AFFINE MULTIPLY ("input_dtype_first", "weight_dtype_first"): y = w ⊙ x̂'   (x̂' = x̂ rounded, see below)
    AFFINE NONE (no weight):                                     y = x̂

μ and r are saved in float32. x̂' is x̂ rounded through the dtype the variant's rounding names (ROUND_DTYPE: x's
dtype for "input_dtype_first", w's for "weight_dtype_first" when w is half precision, float32, no rounding,
otherwise) and back; the AFFINE and ROUND_DTYPE constexprs come from the variant table
(:mod:`hf_gns_spam.kernels.norm_variants`). The product of two half-precision values is exact in
float32, so computing it in float32 and casting once reproduces the module's half-precision multiply.

Backward over a grid of (example b, tile of rows of that example), with ĝ = dy ⊙ (offset + w) (ĝ = dy without
affine), all in float32::

    dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))          (the mean(ĝ) term only for layer_norm)
    partial_w[b, t] = Σ_{rows of tile t of b} dy ⊙ x̂'     partial_b[b, t] = Σ_{rows of tile t of b} dy

The launcher then reduces in torch (deterministic, no atomics)::

    G_w[b] = Σ_t partial_w[b, t]     dw = Σ_b G_w[b]     statistics[0] = Σ_b ‖G_w[b]‖²
    G_b[b] = Σ_t partial_b[b, t]     db = Σ_b G_b[b]     statistics[1] = Σ_b ‖G_b[b]‖²
    statistics[2] = B      (norm_contract.per_example_statistics)

Segments (``segment_ids``, packed rows: the examples are sequences, see the reference): the grid, the tiles and the
passes over x and dy are the same; only the partial sums are kept per sequence, in the same pass. The rows of a tile
are consecutive, so are the rows of a sequence, and sequences are in order: a tile meets a run of sequences
s_first … s_last, of which only s_first and s_last can extend beyond it. The program keeps the open sequence's sums
in its [BLOCK_ROWS, BLOCK_D] accumulator; a block of rows that starts a new sequence (one loop iteration per distinct
id in the block, usually none) closes the open one. When a sequence closes, its vector G (float32, [D] or the
chunk's columns) goes to ``seg[t, 0]`` if it is s_first, else (it lies wholly inside the tile) only ‖G‖² is added
to the tile's scalars. At the tile's end the open sequence goes to ``seg[t, 0]`` (if it is s_first) or
``seg[t, 1]``, and ``partial[t]`` = the closed sequences' sum + the open one (bitwise the unsegmented partial when
the tile lies in one sequence). In torch::

    slots: the 2·P vectors seg[t, 0], seg[t, 1] with ids s_first(t), s_last(t)   (non-decreasing in t)
    G[s] = segment_reduce(sum) over the runs of equal ids  (each a sequential sum over at most 2·P slots)
    statistics[0] = Σ_s ‖G_w[s]‖² + Σ_t inner_w[t]        statistics[1] = Σ_s ‖G_b[s]‖² + Σ_t inner_b[t]
    statistics[2] = E = segment_ids[-1] + 1  (a device tensor: no host read)

Memory is 2·P·D floats per parameter besides the P·D partial sums, whatever E; nothing is read on the host (no tile
table, no count), so the backward neither waits for the GPU nor stops a CUDA graph. The ids are checked on the host
only when they are on the CPU; on a GPU, ids that are negative, decreasing or ≥ 2³¹ − 1 (the kernel reads int32)
make the statistics NaN (and never cause an out-of-bounds access). dx does not depend on the segments; dw and db
only through the summation order of tiles holding several sequences.

Rows of up to ``max_block_d`` (default 8192) features are held in one block: one read of x (forward) and of x and
dy (backward). Wider rows are processed in chunks of ``min(max_block_d, 2048)`` features: the forward makes one pass
for the sums (two for layer_norm: the mean, then the centred sum of squares) and one for the outputs; the backward
makes one pass per row for mean(ĝ) and mean(ĝ ⊙ x̂) (kept in a float32 scratch buffer) and one pass, chunk by chunk,
for dx and the per-example partial sums. Results are deterministic: the launch configuration depends only on the
shapes and on the device's number of SMs.

As in the reference, the MULTIPLY roundings multiply by w alone (no offset, no bias) in the forward, while
the backward's ĝ uses (offset + w) for every rounding. Under the Triton interpreter (CPU tests), float32 → bfloat16
conversions are rounded to nearest even on the bits, because the interpreter's own conversion truncates.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from hf_gns_spam.kernels.norm_contract import (
    STATISTICS_SIZE,
    NormSpec,
    check_segment_layout,
    check_segment_values,
    output_dtype,
    per_example_statistics,
)
from hf_gns_spam.kernels.norm_variants import (
    KERNEL_AFFINE_MULTIPLY,
    KERNEL_AFFINE_NONE,
    KERNEL_AFFINE_SCALE_SHIFT,
)
from hf_gns_spam.kernels.rounding import cast, interpreting

__all__ = ["MAX_BLOCK_D", "gns_norm_backward", "gns_norm_forward"]

#: Largest row held in one block (registers); wider rows are processed in chunks of ``_CHUNK_BLOCK_D`` features.
MAX_BLOCK_D = 8192
_CHUNK_BLOCK_D = 2048
#: Elements per program the launcher aims at when several short rows share a program.
_FORWARD_TILE_ELEMENTS = 2048
_BACKWARD_TILE_ELEMENTS = 2048
#: Backward: at most this many programs per SM (a wide-row program fills an SM's registers: two full waves), but
#: at least this many rows per program (bounds the partial buffers to 1/8 of the rows).
_PROGRAMS_PER_SM = 2
_MIN_ROWS_PER_TILE = 8
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# the AFFINE constexpr (how y is formed), one value per product of the variant table (norm_variants)
_AFFINE_NONE = tl.constexpr(KERNEL_AFFINE_NONE)  # y = x̂
_AFFINE_SCALE_SHIFT = tl.constexpr(KERNEL_AFFINE_SCALE_SHIFT)  # y = x̂' ⊙ (offset + w) + b in float32
_AFFINE_MULTIPLY = tl.constexpr(KERNEL_AFFINE_MULTIPLY)  # y = w ⊙ x̂' in float32, cast once
#: The ROUND_DTYPE constexpr for the dtype a variant rounds x̂ through (float32: no rounding).
_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _round_normalized(x_hat, ROUND_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """x̂' in float32: x̂ rounded through ROUND_DTYPE and back (for float32 both conversions are no-ops)."""
    return cast(x_hat, ROUND_DTYPE, MANUAL_BF16).to(tl.float32)


@triton.jit
def _affine(
    x_hat,
    w,
    bias,
    offset,
    AFFINE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
):
    """y in float32 from x̂ (float32) and the loaded weight and bias rows (broadcastable to x̂)."""
    if AFFINE == _AFFINE_NONE:
        y = x_hat
    elif AFFINE == _AFFINE_SCALE_SHIFT:
        y = x_hat * (offset + w.to(tl.float32))
        if HAS_BIAS:
            y = y + bias.to(tl.float32)
    else:
        y = w.to(tl.float32) * _round_normalized(x_hat, ROUND_DTYPE, MANUAL_BF16)
    return y


@triton.jit
def _inv_std(sum_squares, d_float, eps):
    """r = 1/√(Σ(x − μ)² / D + eps) from the rows' sums of squares (float32, IEEE-rounded)."""
    var = tl.div_rn(sum_squares, d_float)
    return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _store_affine(
    Y,
    ptr,
    mask,
    x_hat,
    W,
    Bias,
    c,
    col_mask,
    offset,
    AFFINE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
):
    """Store y for a [BLOCK_ROWS, BLOCK_D] tile of x̂ at ``ptr``, loading the weight and bias at columns ``c``."""
    w = 0.0
    bias = 0.0
    if AFFINE != 0:
        w = tl.load(W + c, mask=col_mask, other=0.0)[None, :]
        if HAS_BIAS:
            bias = tl.load(Bias + c, mask=col_mask, other=0.0)[None, :]
    y = _affine(x_hat, w, bias, offset, AFFINE, HAS_BIAS, ROUND_DTYPE, MANUAL_BF16)
    tl.store(Y + ptr, cast(y, Y.dtype.element_ty, MANUAL_BF16), mask=mask)


@triton.jit
def _gns_norm_fwd_kernel(
    X,
    W,
    Bias,
    Y,
    Mean,
    Rstd,
    n_rows,
    D,
    d_float,
    eps,
    offset,
    CENTRED: tl.constexpr,
    AFFINE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
):
    """y, μ, r for BLOCK_ROWS consecutive rows of the contiguous [n_rows, D] input."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    row_off = rows.to(tl.int64) * D
    cols = tl.arange(0, BLOCK_D)
    if NUM_CHUNKS == 1:
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        ptr = row_off[:, None] + cols[None, :]
        x = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
        if CENTRED:
            mean = tl.div_rn(tl.sum(x, axis=1), d_float)
            centred = tl.where(mask, x - mean[:, None], 0.0)
        else:
            mean = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            centred = x
        rstd = _inv_std(tl.sum(centred * centred, axis=1), d_float, eps)
        x_hat = centred * rstd[:, None]
        _store_affine(Y, ptr, mask, x_hat, W, Bias, cols, col_mask, offset, AFFINE, HAS_BIAS, ROUND_DTYPE, MANUAL_BF16)
    else:
        # the statistics stay separate from the one-block path: they accumulate chunk by chunk in a tile (one more
        # pass over x for layer_norm) where that path reduces the row it holds
        # pass 1 (and 2 for layer_norm): row statistics, accumulated chunk-wise in a [BLOCK_ROWS, BLOCK_D] tile
        acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        if CENTRED:
            for chunk in range(NUM_CHUNKS):
                c = chunk * BLOCK_D + cols
                mask = row_mask[:, None] & (c < D)[None, :]
                acc += tl.load(X + row_off[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.div_rn(tl.sum(acc, axis=1), d_float)
            acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        else:
            mean = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for chunk in range(NUM_CHUNKS):
            c = chunk * BLOCK_D + cols
            mask = row_mask[:, None] & (c < D)[None, :]
            x = tl.load(X + row_off[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            centred = tl.where(mask, x - mean[:, None], 0.0)
            acc += centred * centred
        rstd = _inv_std(tl.sum(acc, axis=1), d_float, eps)
        # last pass: outputs
        for chunk in range(NUM_CHUNKS):
            c = chunk * BLOCK_D + cols
            col_mask = c < D
            mask = row_mask[:, None] & col_mask[None, :]
            ptr = row_off[:, None] + c[None, :]
            x = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
            x_hat = (x - mean[:, None]) * rstd[:, None]
            _store_affine(Y, ptr, mask, x_hat, W, Bias, c, col_mask, offset, AFFINE, HAS_BIAS, ROUND_DTYPE, MANUAL_BF16)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _load_segments(Seg, rows, first, row_mask, rows_per_token):
    """The segment ids of a block of rows; masked rows get the id of the block's first row (their sums are zero)."""
    segs = tl.load(Seg + rows // rows_per_token, mask=row_mask, other=0)
    return tl.where(row_mask, segs, tl.load(Seg + first // rows_per_token))


@triton.jit
def _segment_close(acc, cur, s_first, SegPart, seg_off, c, col_mask):
    """Close the open segment ``cur`` of one parameter (its sums are ``acc``, [BLOCK_ROWS, BLOCK_D]).

    The tile's first segment (``cur == s_first``) may have begun in an earlier tile: its vector goes to slot 0 of the
    tile's boundary partials. Any later segment closed inside the tile lies wholly in it: only its squared norm is
    kept. Returns (G, ‖G‖²), the squared norm zero for the first segment."""
    v = tl.sum(acc, axis=0)
    is_first = cur == s_first
    tl.store(SegPart + seg_off + c, v, mask=tl.where(is_first, col_mask, False))
    squared = tl.where(is_first, 0.0, tl.sum(v * v, axis=0))
    return v, squared


@triton.jit
def _segment_end(acc, closed, cur, s_first, SegPart, seg_off, Partial, partial_off, c, col_mask, D):
    """The tile's open segment at its end: slot 0 if it is the tile's first segment (slot 1 then zero), else slot 1
    (a segment that may continue in the next tile); and the tile's partial sum, ``closed`` (the sum of the segments
    closed before) plus this one: exactly the unsegmented partial sum when the tile holds one segment."""
    v = tl.sum(acc, axis=0)
    is_first = cur == s_first
    tl.store(SegPart + seg_off + c, v, mask=tl.where(is_first, col_mask, False))
    tl.store(SegPart + seg_off + D + c, tl.where(is_first, 0.0, v), mask=col_mask)
    tl.store(Partial + partial_off + c, closed + v, mask=col_mask)


@triton.jit
def _segment_block(
    segs,
    prod_w,
    prod_b,
    cur,
    s_first,
    acc_w,
    acc_b,
    closed_w,
    closed_b,
    sq_w,
    sq_b,
    SegW,
    SegB,
    seg_off,
    c,
    col_mask,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
):
    """Add a block of rows to the sums of their segments: ``prod_w`` (dy ⊙ x̂') and ``prod_b`` (dy) are the block's
    [BLOCK_ROWS, BLOCK_D] products, ``segs`` [BLOCK_ROWS] the rows' segment ids (masked rows: any id of the block;
    their products are zero). ``acc_*`` hold the open segment ``cur``, ``closed_*`` ([BLOCK_D]) the sum of the
    segments closed so far in the tile. One iteration per distinct id in the block, in increasing order: usually
    one, which only adds to ``acc_*``."""
    hi = tl.max(segs, axis=0)
    s = tl.min(segs, axis=0)
    while s <= hi:
        if s != cur:
            if NEED_DW:
                v, squared = _segment_close(acc_w, cur, s_first, SegW, seg_off, c, col_mask)
                closed_w += v
                sq_w += squared
                acc_w = tl.zeros_like(acc_w)
            if NEED_DB:
                v, squared = _segment_close(acc_b, cur, s_first, SegB, seg_off, c, col_mask)
                closed_b += v
                sq_b += squared
                acc_b = tl.zeros_like(acc_b)
            cur = s
        selected = (segs == s)[:, None]
        if NEED_DW:
            acc_w += tl.where(selected, prod_w, 0.0)
        if NEED_DB:
            acc_b += tl.where(selected, prod_b, 0.0)
        s = tl.min(tl.where(segs > s, segs, hi + 1), axis=0)
    return cur, acc_w, acc_b, closed_w, closed_b, sq_w, sq_b


@triton.jit
def _tile_rows(pid, n_tiles, rows_per_example, rows_per_tile):
    """Rows ``[row_start, row_end)`` of program ``pid = b·n_tiles + t``: tile t of example b, of at most
    ``rows_per_tile`` rows, within the example's ``rows_per_example``."""
    example = pid // n_tiles
    tile = pid - example * n_tiles
    example_start = example * rows_per_example
    row_start = example_start + tile * rows_per_tile
    row_end = tl.minimum(row_start + rows_per_tile, example_start + rows_per_example)
    return row_start, row_end


@triton.jit
def _load_normalized(X, Mean, Rstd, ptr, rows, row_mask, mask, CENTRE: tl.constexpr):
    """(x̂, r) of a [BLOCK_ROWS, BLOCK_D] tile of x at ``ptr`` (rows ``rows``), float32; x̂ is 0 where masked.
    Without CENTRE (rms_norm, one block) x̂ = x·r: masked x is 0 already and μ is 0."""
    x = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
    if CENTRE:
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    else:
        x_hat = x * rstd[:, None]
    return x_hat, rstd


@triton.jit
def _row_means_pass(
    DY,
    X,
    W,
    Mean,
    Rstd,
    RowMeans,
    row_start,
    row_end,
    D,
    d_float,
    offset,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
):
    """Rows wider than a block, pass 1, row by row: ``RowMeans[row] = (mean(ĝ), mean(ĝ ⊙ x̂))`` (float32,
    ``[n_rows, 2]``) over the row's chunks, with ĝ = dy ⊙ (offset + w), for the rows of the tile."""
    cols = tl.arange(0, BLOCK_D)
    for first in range(row_start, row_end, BLOCK_ROWS):
        rows = first + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < row_end
        row_off = rows.to(tl.int64) * D
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        acc_g = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        acc_gx = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        for chunk in range(NUM_CHUNKS):
            c = chunk * BLOCK_D + cols
            col_mask = c < D
            mask = row_mask[:, None] & col_mask[None, :]
            ptr = row_off[:, None] + c[None, :]
            dy = tl.load(DY + ptr, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = dy
            if HAS_WEIGHT:
                g = dy * (offset + tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)[None, :])
            acc_g += g
            acc_gx += g * x_hat
        means_off = rows.to(tl.int64) * 2
        tl.store(RowMeans + means_off, tl.div_rn(tl.sum(acc_g, axis=1), d_float), mask=row_mask)
        tl.store(RowMeans + means_off + 1, tl.div_rn(tl.sum(acc_gx, axis=1), d_float), mask=row_mask)


@triton.jit
def _store_dx(
    DX,
    RowMeans,
    ptr,
    rows,
    row_mask,
    mask,
    g,
    x_hat,
    rstd,
    d_float,
    CENTRED: tl.constexpr,
    WHOLE_ROWS: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
):
    """Store dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂)) (the mean(ĝ) term only for centred kinds) of a block of rows,
    ĝ = ``g``. The means are reduced over the block when it holds WHOLE_ROWS, else read from :func:`_row_means_pass`'s
    ``RowMeans``."""
    mean_g = 0.0
    if WHOLE_ROWS:
        mean_gx = tl.div_rn(tl.sum(g * x_hat, axis=1), d_float)
        if CENTRED:
            mean_g = tl.div_rn(tl.sum(g, axis=1), d_float)
    else:
        mean_gx = tl.load(RowMeans + rows.to(tl.int64) * 2 + 1, mask=row_mask, other=0.0)
        if CENTRED:
            mean_g = tl.load(RowMeans + rows.to(tl.int64) * 2, mask=row_mask, other=0.0)
    correction = mean_gx[:, None] * x_hat
    if CENTRED:
        correction = correction + mean_g[:, None]
    dx = (g - correction) * rstd[:, None]
    tl.store(DX + ptr, cast(dx, DX.dtype.element_ty, MANUAL_BF16), mask=mask)


@triton.jit
def _gns_norm_bwd_kernel(
    DY,
    X,
    W,
    Mean,
    Rstd,
    DX,
    PartialW,
    PartialB,
    RowMeans,
    Seg,
    SegW,
    SegB,
    SegStats,
    rows_per_example,
    D,
    d_float,
    n_tiles,
    rows_per_tile,
    offset,
    rows_per_token,
    CENTRED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    SEGMENTED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
):
    """dx for the rows of tile t of example b, and that tile's partial sums of dy ⊙ x̂' and dy ([D] each).

    Program ``pid = b·n_tiles + t`` owns rows ``[b·R + t·rows_per_tile, min(b·R + (t + 1)·rows_per_tile, (b + 1)·R))``
    (:func:`_tile_rows`) and writes row ``pid`` of the ``[B·n_tiles, D]`` partial buffers. One tile loop, per chunk
    of BLOCK_D features (one chunk when a block holds whole rows; wider rows first get their means from
    :func:`_row_means_pass`): each block of rows gives dy, x̂ and dy ⊙ x̂', which are added to the tile's sums, then
    dx (:func:`_store_dx`).

    The regimes differ only in where a block's products are added and where the tile's sums go. Plain: to one
    [BLOCK_ROWS, BLOCK_D] accumulator per parameter, stored at the end. SEGMENTED (segment ids ``Seg``, one per
    ``rows_per_token`` consecutive rows): to the open segment's accumulator (:func:`_segment_block`); the tile's
    first segment goes to ``Seg{W,B}[pid, 0]``, its last (if another) to ``Seg{W,B}[pid, 1]`` (these two may extend
    into neighbouring tiles); the segments in between lie wholly in the tile and leave only
    ``SegStats[pid] = (Σ‖G_w‖², Σ‖G_b‖²)`` over them.
    """
    pid = tl.program_id(0)
    row_start, row_end = _tile_rows(pid, n_tiles, rows_per_example, rows_per_tile)
    partial_off = pid.to(tl.int64) * D
    cols = tl.arange(0, BLOCK_D)
    if SEGMENTED:
        s_first = tl.load(Seg + row_start // rows_per_token)
        seg_off = pid.to(tl.int64) * 2 * D
        sq_w = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
        sq_b = sq_w
    if NEED_DX and NUM_CHUNKS > 1:
        _row_means_pass(
            DY, X, W, Mean, Rstd, RowMeans, row_start, row_end, D, d_float, offset,
            HAS_WEIGHT, BLOCK_ROWS, BLOCK_D, NUM_CHUNKS,
        )  # fmt: skip
        # make the means written by some threads visible to all threads of the program
        tl.debug_barrier()
    for chunk in range(NUM_CHUNKS):
        c = chunk * BLOCK_D + cols
        col_mask = c < D
        w = 1.0
        if NEED_DX and HAS_WEIGHT:
            w = offset + tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc_w = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        if SEGMENTED:  # acc_* hold the open segment, closed_* the segments closed before it in the tile
            cur = s_first
            closed_w = tl.zeros([BLOCK_D], dtype=tl.float32)
            closed_b = tl.zeros([BLOCK_D], dtype=tl.float32)
        for first in range(row_start, row_end, BLOCK_ROWS):
            rows = first + tl.arange(0, BLOCK_ROWS)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            ptr = rows.to(tl.int64)[:, None] * D + c[None, :]
            dy = tl.load(DY + ptr, mask=mask, other=0.0).to(tl.float32)
            prod_w = 0.0
            if NEED_DX or NEED_DW:
                # centred whenever the block is a chunk (μ is 0 for rms_norm): its masked columns need the where
                x_hat, rstd = _load_normalized(X, Mean, Rstd, ptr, rows, row_mask, mask, CENTRED or NUM_CHUNKS > 1)
                if NEED_DW:
                    prod_w = dy * _round_normalized(x_hat, ROUND_DTYPE, MANUAL_BF16)
            if NEED_DX and NUM_CHUNKS > 1:  # means read from RowMeans: dx first, then x̂ is dead (fewer registers)
                _store_dx(
                    DX, RowMeans, ptr, rows, row_mask, mask, dy * w, x_hat, rstd, d_float, CENTRED, False, MANUAL_BF16
                )  # fmt: skip
            if SEGMENTED:
                segs = _load_segments(Seg, rows, first, row_mask, rows_per_token)
                cur, acc_w, acc_b, closed_w, closed_b, sq_w, sq_b = _segment_block(
                    segs, prod_w, dy, cur, s_first, acc_w, acc_b, closed_w, closed_b, sq_w, sq_b,
                    SegW, SegB, seg_off, c, col_mask, NEED_DW, NEED_DB,
                )  # fmt: skip
            else:
                if NEED_DW:
                    acc_w += prod_w
                if NEED_DB:
                    acc_b += dy
            if NEED_DX and NUM_CHUNKS == 1:  # the sums first: dy is then dead across dx's reductions
                _store_dx(
                    DX, RowMeans, ptr, rows, row_mask, mask, dy * w, x_hat, rstd, d_float, CENTRED, True, MANUAL_BF16
                )  # fmt: skip
        if SEGMENTED:
            if NEED_DW:
                _segment_end(acc_w, closed_w, cur, s_first, SegW, seg_off, PartialW, partial_off, c, col_mask, D)
            if NEED_DB:
                _segment_end(acc_b, closed_b, cur, s_first, SegB, seg_off, PartialB, partial_off, c, col_mask, D)
        else:
            if NEED_DW:
                tl.store(PartialW + partial_off + c, tl.sum(acc_w, axis=0), mask=col_mask)
            if NEED_DB:
                tl.store(PartialB + partial_off + c, tl.sum(acc_b, axis=0), mask=col_mask)
    if SEGMENTED:
        stats_off = pid.to(tl.int64) * 2
        tl.store(SegStats + stats_off, sq_w)
        tl.store(SegStats + stats_off + 1, sq_b)


# --------------------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------------------


def _forward_num_warps(elements: int) -> int:
    """Warps for a forward program handling ``elements`` values at once (Liger-Kernel's ``calculate_settings``).

    The forward keeps few values live per element (about 45–90 registers per thread at 8–16 elements per thread
    on sm_90), so up to 16 elements per thread is fine.
    """
    if elements >= 32768:
        return 32
    if elements >= 8192:
        return 16
    if elements >= 2048:
        return 8
    return 4


def _backward_num_warps(elements: int) -> int:
    """Warps for a backward program handling ``elements`` values at once: 8 elements per thread, 4 to 32 warps.

    The backward keeps w, the dw accumulator, ĝ and x̂ live across the row reductions; at 16 elements per thread
    (Liger's setting) ptxas needs 150–250 registers on sm_90 and spills at 8192 features, at 8 per thread about
    65–130 with no spill for rms_norm up to 8192 features.
    """
    return max(4, min(32, elements // 256))


def _block_d(d: int, max_block_d: int | None) -> tuple[int, int]:
    """(BLOCK_D, number of chunks) for rows of ``d`` features.

    Rows up to ``max_block_d`` features are held in one block; wider rows are processed in chunks of
    ``min(max_block_d, _CHUNK_BLOCK_D)`` features.
    """
    limit = MAX_BLOCK_D if max_block_d is None else max_block_d
    if limit < 1 or limit & (limit - 1):
        raise ValueError(f"max_block_d must be a positive power of two, got {limit}")
    block = triton.next_power_of_2(d)
    if block > limit:
        block = min(limit, _CHUNK_BLOCK_D)
    return block, triton.cdiv(d, block)


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while launching: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # CPU (Triton interpreter): any small number


def _round_dtype(spec: NormSpec, x_dtype: torch.dtype, weight_dtype: torch.dtype | None) -> tl.dtype:
    """The ROUND_DTYPE constexpr: the dtype x̂ is rounded through before the multiplication by w, as the variant's
    rounding says (``Rounding.rounded_dtype``; float32, no rounding, without a weight)."""
    if weight_dtype is None:
        return tl.float32
    return _TRITON_DTYPES[spec.variant.rounding.rounded_dtype(x_dtype, weight_dtype)]


def _check(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be at least 2-D ([B, ..., D]), got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported input dtype {x.dtype}; expected one of {_SUPPORTED_DTYPES}")
    d = x.shape[-1]
    if d == 0:
        raise ValueError("the normalized dimension must not be empty")
    if weight is None and bias is not None:
        raise ValueError("bias without weight is not supported")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"unsupported {name} dtype {p.dtype}; expected one of {_SUPPORTED_DTYPES}")
        if p.shape != (d,):
            raise ValueError(f"{name} must have shape ({d},), got {tuple(p.shape)}")


def gns_norm_forward(
    spec: NormSpec,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    max_block_d: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``x`` over its last dimension; same contract as :func:`norm_reference.norm_forward`.

    Args:
        spec: what the module computes (kind, eps, offset, rounding).
        x: input ``[B, ..., D]`` (float32, bfloat16 or float16; any strides).
        weight: ``[D]`` or None (no affine; then ``bias`` must be None too).
        bias: ``[D]`` or None.
        max_block_d: largest feature block held at once (power of two); wider rows are processed in chunks.
            Defaults to :data:`MAX_BLOCK_D`; tests lower it to exercise the chunked path.

    Returns:
        ``(y, mean, rstd)``: y with x's shape and dtype ``output_dtype(spec, x.dtype, weight.dtype)``; mean and rstd
        float32 of shape ``x.shape[:-1]`` (mean is zeros for rms_norm).
    """
    _check(x, weight, bias)
    d = x.shape[-1]
    weight_dtype = None if weight is None else weight.dtype
    out_dtype = output_dtype(spec, x.dtype, weight_dtype)
    x2 = x.contiguous().view(-1, d)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, d), dtype=out_dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        block_d, num_chunks = _block_d(d, max_block_d)
        block_rows = 1
        if num_chunks == 1:
            block_rows = max(1, min(_FORWARD_TILE_ELEMENTS // block_d, triton.next_power_of_2(n_rows)))
        affine = _AFFINE_NONE if weight is None else spec.variant.rounding.kernel_affine
        has_bias = bias is not None and affine == KERNEL_AFFINE_SCALE_SHIFT
        w = x2 if weight is None else weight.contiguous()
        b = w if bias is None else bias.contiguous()
        grid = (triton.cdiv(n_rows, block_rows),)
        with _device_guard(x.device):
            _gns_norm_fwd_kernel[grid](
                x2,
                w,
                b,
                y,
                mean,
                rstd,
                n_rows,
                d,
                float(d),
                float(spec.eps),
                float(spec.offset),
                CENTRED=spec.variant.kind.centred,
                AFFINE=affine,
                HAS_BIAS=has_bias,
                ROUND_DTYPE=_round_dtype(spec, x.dtype, weight_dtype),
                BLOCK_ROWS=block_rows,
                BLOCK_D=block_d,
                NUM_CHUNKS=num_chunks,
                num_warps=_forward_num_warps(block_rows * block_d),
                MANUAL_BF16=interpreting(),
                enable_fp_fusion=False,  # separate multiply and add, as the torch reference rounds them
            )
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def _plan_tiles(num_examples: int, rows_per_example: int, sm_count: int, rows_per_tile: int | None) -> tuple[int, int]:
    """(rows per tile, tiles per example) for the backward grid of ``num_examples · tiles`` programs."""
    if rows_per_tile is None:
        target_tiles = _PROGRAMS_PER_SM * sm_count // num_examples  # at most the target: no partial last wave
        tiles = max(1, min(target_tiles, rows_per_example // _MIN_ROWS_PER_TILE))
        rows_per_tile = triton.cdiv(rows_per_example, tiles)
    rows_per_tile = max(1, min(rows_per_tile, rows_per_example))
    return rows_per_tile, triton.cdiv(rows_per_example, rows_per_tile)


#: Largest segment id the kernel takes (it reads int32 ids and compares with id + 1).
_MAX_SEGMENT_ID = torch.iinfo(torch.int32).max - 1


def _kernel_segment_ids(segment_ids: Tensor) -> Tensor:
    """The ids as the kernel reads them: int32 (fewer registers than int64), clamped to [-1, _MAX_SEGMENT_ID] so that
    no id wraps or overflows (ids outside [0, _MAX_SEGMENT_ID] make the statistics NaN anyway)."""
    return segment_ids.clamp(-1, _MAX_SEGMENT_ID).to(torch.int32)


def _segment_statistics(
    segment_ids: Tensor,
    seg_w: Tensor | None,
    seg_b: Tensor | None,
    seg_stats: Tensor | None,
    tiles: tuple[int, int, int, int],
    rows_per_token: int,
) -> Tensor:
    """The statistics vector from the segmented kernel's outputs (module docstring), without a host read.

    ``tiles`` is (programs, tiles per example, rows per example, rows per tile) of the launch. Each program left its
    first and last segments' partial sums (slots 0 and 1 of ``seg_w`` / ``seg_b``, [programs, 2, D]) and the
    statistics of the segments wholly inside it (``seg_stats``, [programs, 2]). The 2·programs slots are ordered by
    segment; runs of equal ids are one segment each, summed by ``torch.segment_reduce`` (each output a sequential sum:
    deterministic) into at most 2·programs vectors, then squared.
    """
    n_programs, n_tiles, rows_per_example, rows_per_tile = tiles
    device = segment_ids.device
    flat = segment_ids.reshape(-1)
    statistics = torch.zeros(STATISTICS_SIZE, dtype=torch.float32, device=device)
    statistics[2] = flat[-1] + 1  # E, on the device
    if seg_stats is not None:
        pid = torch.arange(n_programs, device=device)
        example, tile = pid // n_tiles, pid % n_tiles
        start = example * rows_per_example + tile * rows_per_tile
        end = torch.minimum(start + rows_per_tile, (example + 1) * rows_per_example)
        ids = torch.stack([flat[start // rows_per_token], flat[(end - 1) // rows_per_token]], 1).view(-1)  # [2P]
        group = torch.cat([ids.new_zeros(1), (ids[1:] != ids[:-1]).cumsum(0)])  # non-decreasing, [2P]
        slots = torch.arange(2 * n_programs, device=device)
        group_start = torch.searchsorted(group, slots)
        lengths = torch.searchsorted(group, slots, right=True) - group_start  # zero for unused groups
        for index, boundary in ((0, seg_w), (1, seg_b)):
            if boundary is None:
                continue
            sums = torch.segment_reduce(boundary.view(2 * n_programs, -1), "sum", lengths=lengths, axis=0, unsafe=True)
            squared = sums.square().sum(-1)  # [2P], zero for unused groups
            statistics[index] = squared.sum() + seg_stats[:, index].sum()
    # ids the host did not check: NaN statistics (no host read) unless ≥ 0, non-decreasing and at most
    # _MAX_SEGMENT_ID (the kernel reads them as int32)
    valid = (flat[0] >= 0) & (flat[-1] <= _MAX_SEGMENT_ID) & (flat[1:] >= flat[:-1]).all()
    return torch.where(valid, statistics, torch.nan)


def gns_norm_backward(
    spec: NormSpec,
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
    segment_ids: Tensor | None = None,
    *,
    max_block_d: int | None = None,
    rows_per_tile: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor]:
    """Gradients and per-example gradient statistics; same contract as :func:`norm_reference.norm_backward`.

    Args:
        spec: what the module computes.
        dy: upstream gradient, x's shape (any supported dtype, any strides).
        x, weight, bias: the forward's inputs.
        mean, rstd: float32 ``x.shape[:-1]``, as returned by :func:`gns_norm_forward`.
        need_input_grad, need_weight_grad, need_bias_grad: which gradients to compute; work for the others is
            skipped (no per-example buffers for a frozen weight or bias).
        segment_ids: optional int32/int64 ``x.shape[:2]`` (``[N]`` for 2-D x) example (sequence) of each token, ≥ 0
            and non-decreasing in row-major order (module docstring). Not read on the host: on CPU tensors the ids
            are checked here (:func:`norm_contract.check_segment_values`), on other devices statistics computed
            from ids that fail those checks are NaN.
        max_block_d: largest feature block held at once (power of two); defaults to :data:`MAX_BLOCK_D`.
        rows_per_tile: rows of one example handled by one program; defaults to a value that gives about
            two programs per SM. Changing it changes the summation order of dw, db and the statistics.

    Returns:
        ``(dx, dw, db, statistics)``: dx in x's dtype, dw and db in the parameters' dtypes (None when not needed);
        statistics float32 ``[Σ_b ‖G_w[b]‖², Σ_b ‖G_b[b]‖², B]`` with G the per-example gradients
        (:func:`norm_contract.per_example_statistics`), per segment with ``segment_ids`` (then the count E is read
        from the ids on the device). dx, dw and db do not depend on ``segment_ids``.
    """
    _check(x, weight, bias)
    if need_weight_grad and weight is None:
        raise ValueError("need_weight_grad without a weight")
    if need_bias_grad and bias is None:
        raise ValueError("need_bias_grad without a bias")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    device = x.device
    num_examples, d = x.shape[0], x.shape[-1]
    x2 = x.contiguous().view(-1, d)
    n_rows = x2.shape[0]
    rows_per_example = n_rows // num_examples if num_examples else 0
    seg = None
    if segment_ids is not None:
        check_segment_layout(segment_ids, x)
        if segment_ids.device.type == "cpu":
            check_segment_values(segment_ids)
        seg = segment_ids.reshape(-1).contiguous()
    segmented = seg is not None and n_rows > 0 and (need_weight_grad or need_bias_grad)

    def no_work_statistics() -> Tensor:
        if seg is None:
            return per_example_statistics(None, None, num_examples, device)
        if seg.numel() == 0:
            return torch.zeros(STATISTICS_SIZE, dtype=torch.float32, device=device)
        return _segment_statistics(seg, None, None, None, (0, 1, 0, 1), 1)

    if n_rows == 0:
        dx = torch.zeros_like(x) if need_input_grad else None
        dw = torch.zeros_like(weight) if need_weight_grad else None
        db = torch.zeros_like(bias) if need_bias_grad else None
        return dx, dw, db, no_work_statistics()
    if not (need_input_grad or need_weight_grad or need_bias_grad):
        return None, None, None, no_work_statistics()

    dy2 = dy.contiguous().view(-1, d)
    mean1 = mean.reshape(-1).to(torch.float32).contiguous()
    rstd1 = rstd.reshape(-1).to(torch.float32).contiguous()
    block_d, num_chunks = _block_d(d, max_block_d)
    rows_per_tile, n_tiles = _plan_tiles(num_examples, rows_per_example, _sm_count(device), rows_per_tile)
    block_rows = 1
    if num_chunks == 1:
        block_rows = max(1, min(_BACKWARD_TILE_ELEMENTS // block_d, triton.next_power_of_2(rows_per_tile)))
    n_programs = num_examples * n_tiles

    dx2 = torch.empty((n_rows, d), dtype=x.dtype, device=device) if need_input_grad else None
    partial_w = torch.empty((n_programs, d), dtype=torch.float32, device=device) if need_weight_grad else None
    partial_b = torch.empty((n_programs, d), dtype=torch.float32, device=device) if need_bias_grad else None
    row_means = None  # (mean(ĝ), mean(ĝ ⊙ x̂)) per row, for dx of rows wider than a block
    if need_input_grad and num_chunks > 1:
        row_means = torch.empty((n_rows, 2), dtype=torch.float32, device=device)
    seg_w = seg_b = seg_stats = None
    rows_per_token = 1
    if segmented:
        rows_per_token = n_rows // seg.numel()
        seg_w = torch.empty((n_programs, 2, d), dtype=torch.float32, device=device) if need_weight_grad else None
        seg_b = torch.empty((n_programs, 2, d), dtype=torch.float32, device=device) if need_bias_grad else None
        seg_stats = torch.empty((n_programs, 2), dtype=torch.float32, device=device)

    def arg(t: Tensor | None) -> Tensor:
        return rstd1 if t is None else t  # a placeholder pointer for buffers a disabled branch never touches

    with _device_guard(device):
        _gns_norm_bwd_kernel[(n_programs,)](
            dy2,
            x2,
            arg(None if weight is None else weight.contiguous()),
            mean1,
            rstd1,
            arg(dx2),
            arg(partial_w),
            arg(partial_b),
            arg(row_means),
            _kernel_segment_ids(seg) if segmented else rstd1,
            arg(seg_w),
            arg(seg_b),
            arg(seg_stats),
            rows_per_example,
            d,
            float(d),
            n_tiles,
            rows_per_tile,
            float(spec.offset),
            rows_per_token,
            CENTRED=spec.variant.kind.centred,
            HAS_WEIGHT=weight is not None,
            ROUND_DTYPE=_round_dtype(spec, x.dtype, None if weight is None else weight.dtype),
            NEED_DX=need_input_grad,
            NEED_DW=need_weight_grad,
            NEED_DB=need_bias_grad,
            SEGMENTED=segmented,
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
            NUM_CHUNKS=num_chunks,
            num_warps=_backward_num_warps(block_rows * block_d),
            MANUAL_BF16=interpreting(),
            enable_fp_fusion=False,
        )

    dx = dw = db = weight_per_example = bias_per_example = None
    if need_input_grad:
        dx = dx2.view(x.shape)
    if need_weight_grad:
        weight_per_example = partial_w.view(num_examples, n_tiles, d).sum(1)
        dw = weight_per_example.sum(0).to(weight.dtype)
    if need_bias_grad:
        bias_per_example = partial_b.view(num_examples, n_tiles, d).sum(1)
        db = bias_per_example.sum(0).to(bias.dtype)
    if segmented:
        tiles = (n_programs, n_tiles, rows_per_example, rows_per_tile)
        statistics = _segment_statistics(seg, seg_w, seg_b, seg_stats, tiles, rows_per_token)
    elif seg is not None:
        statistics = no_work_statistics()
    else:
        statistics = per_example_statistics(weight_per_example, bias_per_example, num_examples, device)
    return dx, dw, db, statistics
