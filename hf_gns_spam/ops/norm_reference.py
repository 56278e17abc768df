"""Pure-torch forward and backward of a normalization layer that also returns per-example gradient statistics.

This is the implementation used on CPU and on any device without Triton, and the reference the Triton kernels in
:mod:`hf_gns_spam.kernels.gns_norm` are tested against. All statistics are computed in float32.

Shapes: ``x`` is viewed as ``[B, R, D]``: B examples (the first dimension of the module's input), R rows per example
(all middle dimensions: tokens, heads, ...), D features (the normalized last dimension).

Segments (packed and padding-free batches): with ``segment_ids``, an integer tensor of shape ``x.shape[:2]`` (``[N]``
for a 2-D ``x`` of shape ``[N, D]``), the examples are sequences, not rows of dimension 0. ``segment_ids[b, t]`` is
the example e of token (b, t), in [0, E) with E = max + 1, non-decreasing in row-major order (each sequence's tokens
are contiguous, sequences in order; an unused id is an example with a zero gradient). The rows of further dimensions
(heads of ``[B, T, H, D]``) belong to the example of their (b, t). Every per-example quantity below is then per
segment: b runs over the E segments and "rows of b" are the rows of segment b.

Forward, per row, in float32 (the variant table :mod:`hf_gns_spam.kernels.norm_variants` gives each variant's
kind, offset, rounding and bias; ``offset`` is 1 for Gemma's ``(1 + w)``, else 0)::

    layer_norm: μ = mean(x),  r = 1/√(mean((x − μ)²) + eps),  x̂ = (x − μ)·r
    rms_norm:   μ = 0,        r = 1/√(mean(x²) + eps),         x̂ = x·r
    y = x̂' ⊙ (offset + w) + b

where x̂' is x̂ rounded as the original module rounds it (``rounding``, the table's :class:`Rounding`)::

    "float32_product"     x̂ multiplied by (offset + w) in float32, then cast to x.dtype    (nn.LayerNorm, Gemma, Olmo2)
    "input_dtype_first"   x̂ cast to x.dtype, then multiplied by w in the promoted dtype of (w, x)         (LlamaRMSNorm)
    "weight_dtype_first"  x̂ cast to w.dtype if w is half precision, then multiplied by w                 (T5LayerNorm)

Backward, with dy the upstream gradient and ĝ = dy ⊙ (offset + w) (float32)::

    dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))        (the mean(ĝ) term only for layer_norm)
    per-example weight gradient   G_w[b] = Σ_{rows of b} dy ⊙ x̂'      dw = Σ_b G_w[b]
    per-example bias gradient     G_b[b] = Σ_{rows of b} dy            db = Σ_b G_b[b]
    statistics = (Σ_b ‖G_w[b]‖², Σ_b ‖G_b[b]‖², B)

With segments, B is E; here dx, dw and db are computed exactly as without segments (bit for bit), only the
statistics change (the Triton kernels' dw and db may differ in the last bits: summation order).

Checks of ``segment_ids``: :func:`check_segment_layout` (dtype int32/int64, shape, device; reads no values) wherever
the ids enter; :func:`check_segment_values` (≥ 0, non-decreasing) reads the values: the operator calls it in the
forward for CPU tensors, and this module's backward always calls it (on an accelerator that is a host
synchronisation, acceptable off the Triton path). The Triton backward checks CPU tensors the same way; on a GPU it
reads nothing on the host and returns NaN statistics for ids that fail these checks (see
:mod:`hf_gns_spam.kernels.gns_norm`).
"""

from __future__ import annotations

import torch

from hf_gns_spam.kernels.norm_contract import (
    HALF_DTYPES,
    SEGMENT_ID_DTYPES,
    STATISTICS_SIZE,
    NormSpec,
    check_segment_layout,
    check_segment_values,
    output_dtype,
    per_example_statistics,
    segment_shape,
)

__all__ = [
    "HALF_DTYPES",
    "SEGMENT_ID_DTYPES",
    "STATISTICS_SIZE",
    "NormSpec",
    "check_segment_layout",
    "check_segment_values",
    "norm_backward",
    "norm_forward",
    "output_dtype",
    "per_example_statistics",
    "segment_shape",
    "segment_sums",
]


def rounded_normalized(spec: NormSpec, x_hat: torch.Tensor, x_dtype: torch.dtype, weight_dtype: torch.dtype):
    """x̂' in its rounded dtype: x̂ after the rounding the original module applies before the multiplication by w."""
    return x_hat.to(spec.variant.rounding.rounded_dtype(x_dtype, weight_dtype))


def normalize(spec: NormSpec, x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (x̂, mean, rstd) in float32 for ``x3`` of shape [..., D]; mean is zeros for kinds that are not
    centred (rms_norm)."""
    xf = x3.float()
    if spec.variant.kind.centred:
        mean = xf.mean(-1)
        centred = xf - mean.unsqueeze(-1)
    else:
        mean = torch.zeros(xf.shape[:-1], dtype=torch.float32, device=xf.device)
        centred = xf
    rstd = torch.rsqrt(centred.square().mean(-1) + spec.eps)
    return centred * rstd.unsqueeze(-1), mean, rstd


def norm_forward(
    spec: NormSpec, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (y, mean, rstd); mean and rstd are float32 with x's leading shape (saved for the backward)."""
    x_hat, mean, rstd = normalize(spec, x)
    weight_dtype = None if weight is None else weight.dtype
    if weight is None:
        y = x_hat
    else:
        x_hat_rounded = rounded_normalized(spec, x_hat, x.dtype, weight.dtype)
        y = spec.variant.rounding.product(x_hat_rounded, weight, bias, spec.offset)
    return y.to(output_dtype(spec, x.dtype, weight_dtype)), mean, rstd


def segment_sums(rows: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per-segment sums ``[E, D]`` of ``rows`` ``[N, D]`` (float32, deterministic); the tokens of ``segment_ids``
    (already checked) own N / numel consecutive rows each."""
    flat = segment_ids.reshape(-1)
    if num_segments == 0:
        return rows.new_zeros((0, rows.shape[-1]), dtype=torch.float32)
    rows_per_token = rows.shape[0] // flat.numel()
    lengths = torch.bincount(flat, minlength=num_segments) * rows_per_token
    return torch.segment_reduce(rows.float(), "sum", lengths=lengths, axis=0, unsafe=True)


def norm_backward(
    spec: NormSpec,
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Return (dx, dw, db, statistics), statistics as :func:`per_example_statistics` gives them.

    Per-example terms are computed only for the parameters whose gradient is needed. With ``segment_ids`` (module
    docstring) the examples are the segments: the ids are checked (:func:`check_segment_values`, a host read) and
    the statistics are those of the per-segment gradients; dx, dw and db are unchanged.
    """
    num_segments = None
    if segment_ids is not None:
        check_segment_layout(segment_ids, x)
        num_segments = check_segment_values(segment_ids)
    num_examples = x.shape[0]
    x3 = x.reshape(num_examples, -1, x.shape[-1])
    dy3 = dy.reshape(x3.shape).float()
    mean3 = mean.reshape(num_examples, -1, 1)
    rstd3 = rstd.reshape(num_examples, -1, 1)
    x_hat = (x3.float() - mean3) * rstd3

    dx = dw = db = None
    if need_input_grad:
        scaled_dy = dy3 if weight is None else dy3 * (spec.offset + weight.float())
        correction = (scaled_dy * x_hat).mean(-1, keepdim=True) * x_hat
        if spec.variant.kind.centred:
            correction = correction + scaled_dy.mean(-1, keepdim=True)
        dx = ((scaled_dy - correction) * rstd3).to(x.dtype).reshape(x.shape)
    weight_per_example = bias_per_example = None
    if need_weight_grad:
        weight_products = dy3 * rounded_normalized(spec, x_hat, x.dtype, weight.dtype).float()
        weight_per_example = weight_products.sum(1)  # [B, D]
        dw = weight_per_example.sum(0).to(weight.dtype)
    if need_bias_grad:
        bias_per_example = dy3.sum(1)
        db = bias_per_example.sum(0).to(bias.dtype)
    if num_segments is not None:
        # the same products, summed per segment instead of per row of dimension 0 (dw and db as above)
        d = x.shape[-1]
        if need_weight_grad:
            weight_per_example = segment_sums(weight_products.reshape(-1, d), segment_ids, num_segments)
        if need_bias_grad:
            bias_per_example = segment_sums(dy3.reshape(-1, d), segment_ids, num_segments)
        num_examples = num_segments
    statistics = per_example_statistics(weight_per_example, bias_per_example, num_examples, x.device)
    return dx, dw, db, statistics
