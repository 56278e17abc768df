"""Pure-torch forward and backward of a normalization layer that also returns per-example gradient statistics.

This is the implementation used on CPU and on any device without Triton, and the reference the Triton kernels in
:mod:`hf_gns_spam.kernels.gns_norm` are tested against. All statistics are computed in float32.

Shapes: ``x`` is viewed as ``[B, R, D]``: B examples (the first dimension of the module's input), R rows per example
(all middle dimensions: tokens, heads, ...), D features (the normalized last dimension).

Forward, per row, in float32 (``offset`` is 1 for Gemma's ``(1 + w)``, else 0)::

    layer_norm: μ = mean(x),  r = 1/√(mean((x − μ)²) + eps),  x̂ = (x − μ)·r
    rms_norm:   μ = 0,        r = 1/√(mean(x²) + eps),         x̂ = x·r
    y = x̂' ⊙ (offset + w) + b

where x̂' is x̂ rounded as the original module rounds it (``rounding``):

    "layer_norm"  nn.LayerNorm / F.layer_norm: everything in float32, y cast to x.dtype
    "llama"       x̂ cast to x.dtype, then multiplied by w in the promoted dtype of (w, x)  (LlamaRMSNorm)
    "fp32"        x̂ multiplied by (offset + w) in float32, then cast to x.dtype           (Gemma, Olmo2)
    "t5"          x̂ cast to w.dtype if w is half precision, then multiplied by w           (T5LayerNorm)

Backward, with dy the upstream gradient and ĝ = dy ⊙ (offset + w) (float32)::

    dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))        (the mean(ĝ) term only for layer_norm)
    per-example weight gradient   G_w[b] = Σ_rows dy ⊙ x̂'      dw = Σ_b G_w[b]
    per-example bias gradient     G_b[b] = Σ_rows dy            db = Σ_b G_b[b]
    statistics = (Σ_b ‖G_w[b]‖², Σ_b ‖G_b[b]‖², B, Σ_b c_b‖G_w[b]‖², Σ_b c_b‖G_b[b]‖²)

where c_b are optional per-example scales (``example_scales``, 1 when not given): with c_b = 1/a_b², a_b the
weight of example b in the batch loss, the last two entries are the sums of the squared per-example gradients of
the examples' own losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROUNDINGS = ("layer_norm", "llama", "fp32", "t5")
HALF_DTYPES = (torch.float16, torch.bfloat16)
STATISTICS_SIZE = 5  # Σ‖G_w[b]‖², Σ‖G_b[b]‖², examples, Σ c_b‖G_w[b]‖², Σ c_b‖G_b[b]‖²


@dataclass(frozen=True)
class NormSpec:
    """What a normalization module computes: enough to reproduce its output, dtype and gradients."""

    kind: str  # "layer_norm" or "rms_norm"
    eps: float
    offset: float = 0.0  # the weight enters as (offset + w): 1.0 for Gemma-style zero-centred weights
    rounding: str = "layer_norm"

    def __post_init__(self) -> None:
        if self.kind not in ("layer_norm", "rms_norm"):
            raise ValueError(f"NormSpec.kind must be 'layer_norm' or 'rms_norm', got {self.kind!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"NormSpec.rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.offset != 0.0 and self.rounding != "fp32":
            raise ValueError("NormSpec.offset (the (offset + w) form) is supported with rounding 'fp32' only")


def output_dtype(spec: NormSpec, x_dtype: torch.dtype, weight_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the original module returns for this input and weight dtype."""
    if weight_dtype is None or spec.rounding in ("layer_norm", "fp32"):
        return x_dtype
    if spec.rounding == "llama":
        return torch.promote_types(weight_dtype, x_dtype)
    # t5: x̂ is float32, cast to the weight's dtype only when that is half precision
    return weight_dtype if weight_dtype in HALF_DTYPES else torch.promote_types(weight_dtype, torch.float32)


def rounded_normalized(spec: NormSpec, x_hat: torch.Tensor, x_dtype: torch.dtype, weight_dtype: torch.dtype | None):
    """x̂' in float32: x̂ after the rounding the original module applies before the multiplication by w."""
    if spec.rounding == "llama":
        return x_hat.to(x_dtype).float()
    if spec.rounding == "t5" and weight_dtype in HALF_DTYPES:
        return x_hat.to(weight_dtype).float()
    return x_hat


def normalize(spec: NormSpec, x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (x̂, mean, rstd) in float32 for ``x3`` of shape [..., D]; mean is zeros for rms_norm."""
    xf = x3.float()
    if spec.kind == "layer_norm":
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
    out_dtype = output_dtype(spec, x.dtype, weight_dtype)
    if weight is None:
        y = x_hat
    elif spec.rounding == "llama":
        y = weight * x_hat.to(x.dtype)
        return y.to(out_dtype), mean, rstd
    elif spec.rounding == "t5":
        y = weight * (x_hat.to(weight.dtype) if weight.dtype in HALF_DTYPES else x_hat)
        return y.to(out_dtype), mean, rstd
    else:
        y = x_hat * (spec.offset + weight.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype), mean, rstd


def per_example_statistics(
    weight_per_example: torch.Tensor | None,
    bias_per_example: torch.Tensor | None,
    num_examples: int,
    example_scales: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """The float32 statistics vector (module docstring) from the per-example gradients G[b], shape [B, D]."""
    statistics = torch.zeros(STATISTICS_SIZE, dtype=torch.float32, device=device)
    statistics[2] = num_examples
    for index, per_example in ((0, weight_per_example), (1, bias_per_example)):
        if per_example is None:
            continue
        squared_norms = per_example.float().square().sum(-1)  # [B]
        statistics[index] = squared_norms.sum()
        scaled = squared_norms if example_scales is None else squared_norms * example_scales.to(squared_norms)
        statistics[3 + index] = scaled.sum()
    return statistics


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
    example_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Return (dx, dw, db, statistics), statistics as :func:`per_example_statistics` gives them.

    Per-example terms are computed only for the parameters whose gradient is needed.
    """
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
        if spec.kind == "layer_norm":
            correction = correction + scaled_dy.mean(-1, keepdim=True)
        dx = ((scaled_dy - correction) * rstd3).to(x.dtype).reshape(x.shape)
    weight_per_example = bias_per_example = None
    if need_weight_grad:
        weight_per_example = (dy3 * rounded_normalized(spec, x_hat, x.dtype, weight.dtype)).sum(1)  # [B, D]
        dw = weight_per_example.sum(0).to(weight.dtype)
    if need_bias_grad:
        bias_per_example = dy3.sum(1)
        db = bias_per_example.sum(0).to(bias.dtype)
    statistics = per_example_statistics(weight_per_example, bias_per_example, num_examples, example_scales, x.device)
    return dx, dw, db, statistics
