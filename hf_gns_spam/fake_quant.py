"""Low-bit quantization-aware training of linear layers: the W4A4 fake quantization of the Stable-SPAM paper.

The paper's 4-bit runs (Huang et al. 2025, official code ``utils/act_weight_quantization.py``) train with the
weights and the input activations of the attention and MLP projections (q, k, v, o, gate, up, down) rounded to
``bits``-bit integers in the forward pass, the gradients left in full precision. For a group of G consecutive
elements along the input dimension:

* weights, asymmetric min-max, round to nearest (levels 0 … 2^b − 1):
      s = (max − min) / (2^b − 1),   z = round(−min / s),   ŵ = (clamp(round(w / s) + z, 0, 2^b − 1) − z) · s
* activations, symmetric absmax with the ``keep_outliers`` largest |x| of the group kept exactly
  (levels −q … q, q = 2^(b−1) − 1):
      s = max_{rest} |x| / q,   x̂ = clamp(round(x / s), −q, q) · s   (outliers: x̂ = x)

When G does not divide the input dimension, its last n mod G elements form one shorter group. The forward pass
computes y = x̂ ŵᵀ + b; the backward pass is the straight-through estimator the paper uses, x̂ and ŵ treated as x
and w:

      ∂L/∂x = ∂L/∂y · ŵ,   ∂L/∂w = (∂L/∂y)ᵀ · x̂,   ∂L/∂b = Σ ∂L/∂y

(written as ``x + (x̂ − x).detach()``: autograd then gives exactly these). ``apply_fake_quantization`` swaps the
chosen ``nn.Linear`` modules for ``FakeQuantLinear`` modules that hold the *same* parameter objects, so parameter
names, the state dict, the optimizer and ``save_pretrained`` see no difference; ``remove_fake_quantization`` swaps
them back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# the projections the paper quantizes (LLaMA / Mistral / Qwen names)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _in_groups(x: torch.Tensor, group_size: int, quantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``quantize`` to x (…, n) viewed as groups (…, n // G, G) of G consecutive elements along the last
    dimension, and to the remaining n % G elements as one shorter group."""
    n = x.shape[-1]
    whole = n - n % group_size
    parts = []
    if whole:
        grouped = x[..., :whole].reshape(*x.shape[:-1], whole // group_size, group_size)
        parts.append(quantize(grouped).flatten(-2))
    if whole < n:
        parts.append(quantize(x[..., whole:].unsqueeze(-2)).squeeze(-2))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def fake_quantize_weight(weight: torch.Tensor, bits: int = 4, group_size: int = 256) -> torch.Tensor:
    """ŵ: asymmetric min-max quantization to ``bits`` bits in groups of ``group_size`` along the last dimension,
    dequantized (same shape and dtype; computed in float32). See the module docstring for the formula."""
    _check(bits, group_size)
    top = 2**bits - 1

    def quantize(groups: torch.Tensor) -> torch.Tensor:
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / top).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.round(-low / scale)
        return (torch.clamp(torch.round(groups / scale) + zero, 0, top) - zero) * scale

    return _in_groups(weight.detach().float(), group_size, quantize).to(weight.dtype)


def fake_quantize_activation(
    x: torch.Tensor, bits: int = 4, group_size: int = 256, keep_outliers: int = 2
) -> torch.Tensor:
    """x̂: symmetric absmax quantization to ``bits`` bits in groups of ``group_size`` along the last dimension, the
    ``keep_outliers`` largest magnitudes of each group kept exactly (at most all but one of a group), dequantized
    (same shape and dtype; computed in float32)."""
    _check(bits, group_size)
    if keep_outliers < 0:
        raise ValueError(f"keep_outliers must be >= 0, got {keep_outliers}")
    top = 2 ** (bits - 1) - 1

    def quantize(groups: torch.Tensor) -> torch.Tensor:
        magnitude = groups.abs()
        outlier = torch.zeros_like(groups, dtype=torch.bool)
        keep = min(keep_outliers, groups.shape[-1] - 1)
        if keep > 0:
            outlier.scatter_(-1, magnitude.topk(keep, dim=-1).indices, True)
        absmax = magnitude.masked_fill(outlier, 0.0).amax(-1, keepdim=True)
        scale = (absmax / top).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(outlier, groups, torch.clamp(torch.round(groups / scale), -top, top) * scale)

    return _in_groups(x.detach().float(), group_size, quantize).to(x.dtype)


def _check(bits: int, group_size: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8 (4: the paper's INT4), got {bits!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight and input (straight-through backward).

    Built by ``FakeQuantLinear.from_linear(linear, ...)``, which shares the linear's parameters."""

    bits: int
    group_size: int
    keep_outliers: int

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int = 4, group_size: int = 256, keep_outliers: int = 2
    ) -> FakeQuantLinear:
        _check(bits, group_size)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias  # the same Parameter objects
        module.train(linear.training)
        module.bits, module.group_size, module.keep_outliers = bits, group_size, keep_outliers
        return module

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this module's parameters."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        linear.train(self.training)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + (fake_quantize_weight(self.weight, self.bits, self.group_size) - self.weight).detach()
        quantized = fake_quantize_activation(x, self.bits, self.group_size, self.keep_outliers)
        return F.linear(x + (quantized - x).detach(), weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}, "
            f"keep_outliers={self.keep_outliers}"
        )


def apply_fake_quantization(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 256,
    keep_outliers: int = 2,
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
) -> list[str]:
    """Swap every ``nn.Linear`` whose name ends with one of ``target_modules`` for a ``FakeQuantLinear``, in place.

    Returns the swapped modules' names. Raises ``ValueError`` when nothing matches (the model names its
    projections differently, or uses another layer type such as GPT-2's ``Conv1D``) or when the model is already
    fake-quantized."""
    _check(bits, group_size)
    if any(isinstance(module, FakeQuantLinear) for module in model.modules()):
        raise ValueError("the model is already fake-quantized; call remove_fake_quantization(model) first")
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in target_modules
    ]
    if not chosen:
        names = sorted({type(m).__name__ for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in target_modules})
        found = f"modules with those names are {', '.join(names)}" if names else "no module has one of those names"
        raise ValueError(
            f"no nn.Linear named one of {list(target_modules)} in {type(model).__name__} ({found}); pass "
            "target_modules= with the names of the model's projection layers (nn.Linear only)"
        )
    for name, module in chosen:
        model.set_submodule(name, FakeQuantLinear.from_linear(module, bits, group_size, keep_outliers))
    return [name for name, _ in chosen]


def remove_fake_quantization(model: nn.Module) -> list[str]:
    """Swap every ``FakeQuantLinear`` back for a plain ``nn.Linear`` (same parameters); returns their names."""
    chosen = [(name, module) for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)]
    for name, module in chosen:
        model.set_submodule(name, module.to_linear())
    return [name for name, _ in chosen]
