"""Each label token's weight in the loss, observed in the backward at the logits.

A loss built from the label cross-entropies, L = Σ_t c_t·ℓ_t with ℓ_t = (1 − ε)·(−log p_t(y_t)) + ε·mean_v(−log p_t(v))
(ε the label smoothing), sends to the logits z_t of every label position t the gradient

    ∂L/∂z_t = c_t·d_t,   d_t = softmax(z_t) − (1 − ε)·onehot(y_t) − ε/V,

and nothing to the other positions. So the token weights are observed, not guessed: c_t = ⟨G_t, d_t⟩ / ‖d_t‖² with
G_t the gradient that reached the logits, and the part of G that is not of this form,

    residual = ‖G − Σ_t c_t·d_t‖² / ‖G‖²   (over all positions, label positions or not),

says whether the loss is such a sum at all. For outputs that carry log-probabilities of the labels instead of logits
(TRL's fused LM head), ∂L/∂log p_t = −c_t directly (and the residual is not defined: the positions without a label
hold constants there).

:class:`LogitGradientProbe` takes these on the micro-batches where GNSCallback identifies or verifies the examples'
weighting (:mod:`hf_gns_spam.gns.example_weights`): the weighting matched from the loss value must give, for every
label token of example b, c_t = a_b / n_b. A loss whose weights differ (a mean of per-sequence means, per-example
importance weights, position-weighted tokens), however close its value, is then refused at the first step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hf_gns_spam.gns.example_weights import TOKEN_CHUNK, ExampleWeightError, label_positions

__all__ = ["LogitGradientProbe"]

# a loss that is a per-token multiple of d_t leaves a residual at rounding level; anything else leaves far more
# (measured: ~1e-15 for the model's own loss with float32 logits, 1e-6 for a z-loss of weight 1e-4)
RESIDUAL_TOLERANCE = {torch.float32: 1e-10, torch.float64: 1e-20}
WEIGHT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
LOW_PRECISION_TOLERANCE = (1e-4, 3e-2)  # (residual, weights) for bf16 / fp16 gradients


class LogitGradientProbe:
    """Observes, in the backward of one micro-batch, the weight c_t of each label position in the loss.

    Made from the micro-batch's model outputs and labels before the backward (:meth:`attach` returns None when the
    outputs carry neither logits nor label log-probabilities); :meth:`select` after it keeps the candidate
    weighting whose weights the observed c_t are.
    """

    def __init__(
        self, tensor: torch.Tensor, kind: str, labels: torch.Tensor, shifted: bool, smoothing: float, sequences
    ) -> None:
        self.kind, self.labels, self.smoothing = kind, labels, smoothing
        self._values: torch.Tensor | None = tensor.detach()  # released once the backward has been observed
        labels = labels.to(tensor.device)
        if labels.dim() == 1:  # classification: one label per example, logits [B, C] seen as [B, 1, C]
            shifted = False
        elif kind == "log_probs":  # aligned with labels[:, 1:] when one position shorter
            shifted = tensor.dim() > 1 and tensor.shape[1] == labels.shape[1] - 1
        # the label positions, as indices into the observed tensor (logits [B, T, V] or [B, 1, C]; label
        # log-probabilities [B, T] or [B, T − 1])
        self.positions = label_positions(labels, shifted, sequences)
        self.token_weights: torch.Tensor | None = None  # c_t at self.positions
        self.residual: float | None = None
        self._handle = tensor.register_hook(self._observe)

    @classmethod
    def attach(
        cls, outputs: Any, labels: torch.Tensor, shifted: bool, smoothing: float, sequences: torch.Tensor | None
    ) -> LogitGradientProbe | None:
        get = outputs.get if isinstance(outputs, Mapping) else (lambda key: getattr(outputs, key, None))
        logits, log_probs = get("logits"), get("log_probs")
        if isinstance(logits, torch.Tensor) and logits.requires_grad:
            return cls(logits, "logits", labels, shifted, smoothing, sequences)
        if isinstance(log_probs, torch.Tensor) and log_probs.requires_grad and not smoothing:
            return cls(log_probs, "log_probs", labels, shifted, smoothing, sequences)
        return None

    @property
    def informative(self) -> bool:
        """Whether this micro-batch tells the weightings apart: one label per example (classification, where the
        weights show directly), one example with labels (its weight's scale is checked), or examples with unequal
        numbers of label tokens (a token mean and a mean of per-example means differ only then)."""
        if self.labels.dim() == 1:
            return True
        counts = torch.bincount(self.positions.owners)
        counts = counts[counts > 0]
        return counts.numel() <= 1 or bool((counts != counts[0]).any())

    def _observe(self, grad: torch.Tensor) -> None:
        self._handle.remove()
        with torch.no_grad():
            values, self._values = self._values, None  # the logits are not kept past their backward
            if values.dim() == 2 and self.kind == "logits":
                values, grad = values.unsqueeze(1), grad.unsqueeze(1)
            rows, positions, targets = self.positions.rows, self.positions.positions, self.positions.targets
            total = grad.double().square().sum()
            if self.kind == "log_probs":  # the loss is Σ_t c_t·(−log p_t) by construction; ignored positions hold
                weights = -grad[rows, positions].double()  # constants (zeros), whatever gradient they receive
                unexplained = total.new_zeros(())
            else:
                width = values.shape[-1]
                flat_values, flat_grad = values.reshape(-1, width), grad.reshape(-1, width)
                index = rows * values.shape[1] + positions
                # what reached positions without a label, then what at the label positions is not along d_t
                pieces, unexplained = [], total - grad[rows, positions].double().square().sum()
                for chunk in torch.arange(index.numel(), device=index.device).split(TOKEN_CHUNK):
                    direction = torch.softmax(flat_values[index[chunk]].float(), dim=-1) - self.smoothing / width
                    direction[torch.arange(chunk.numel(), device=grad.device), targets[chunk]] -= 1.0 - self.smoothing
                    observed = flat_grad[index[chunk]].float()
                    along = (observed * direction).sum(-1, keepdim=True)
                    length_sq = direction.square().sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                    token_weights = along / length_sq
                    pieces.append(token_weights.squeeze(-1).double())
                    unexplained = unexplained + (observed - token_weights * direction).double().square().sum()
                weights = torch.cat(pieces) if pieces else total.new_zeros(0)
            self.token_weights = weights
            self.residual = float(unexplained.clamp_min(0.0) / total) if total > 0 else 0.0
            self._grad_dtype = grad.dtype

    def select(self, candidates: dict[Any, torch.Tensor]) -> Any:
        """The first of ``candidates`` (weightings whose value matched the loss, each with its weights a_b of the
        micro-batch's examples in the units of the back-propagated loss) under which the observed c_t are a_b / n_b
        at every label token of example b; :class:`ExampleWeightError` if none (or if the loss is not a weighted sum
        of the label cross-entropies at all)."""
        if self.token_weights is None:
            raise ExampleWeightError(
                f"GNSCallback watched the {self.kind} of a training micro-batch, but no gradient reached them in the "
                "backward: the loss is not computed from them, so the examples' weights in it cannot be observed"
            )
        if self._grad_dtype in RESIDUAL_TOLERANCE:
            residual_tolerance, weight_tolerance = (
                RESIDUAL_TOLERANCE[self._grad_dtype],
                WEIGHT_TOLERANCE[self._grad_dtype],
            )
        else:
            residual_tolerance, weight_tolerance = LOW_PRECISION_TOLERANCE
        if self.residual > residual_tolerance:
            raise ExampleWeightError(
                f"the gradient that reached the {self.kind} is not a weighted sum of the label tokens' cross-entropy "
                f"gradients: {self.residual:.3g} of its squared norm is something else (tolerance "
                f"{residual_tolerance:g}). The loss uses more than each label token's cross-entropy (a z-loss, an "
                "auxiliary or distillation term, other positions), so it cannot be split into per-example "
                "contributions; GNSCallback supports losses that are weighted sums of the examples' token "
                "cross-entropies"
            )
        owner = self.positions.owners
        tokens = torch.bincount(owner).double()
        observed_examples = torch.zeros_like(tokens).index_add_(0, owner, self.token_weights)
        reports = []
        for weighting, expected in candidates.items():
            expected = expected.double().to(owner.device)
            per_token = (expected[: tokens.numel()] / tokens.clamp_min(1.0))[owner]
            error = (self.token_weights - per_token).abs().sum()
            if error <= weight_tolerance * per_token.abs().sum():
                return weighting
            ratio = self.token_weights / per_token.clamp_min(torch.finfo(torch.float64).tiny)
            reports.append(
                f"{weighting}: observed/expected per token in [{float(ratio.min()):.4g}, {float(ratio.max()):.4g}], "
                f"per example {_short(expected)}"
            )
        raise ExampleWeightError(
            f"the loss's value matched {len(candidates)} weighting(s) of the examples, but the gradient that reached "
            f"the {self.kind} weights the label tokens otherwise: observed per example {_short(observed_examples)} "
            f"(in units of the back-propagated loss), against {'; '.join(reports)}. GNSCallback supports losses "
            "whose every example's tokens count equally within it, weighted as in hf_gns_spam.gns.example_weights: "
            "a token sum over num_items_in_batch (the model's own loss), a token mean or an example mean over the "
            "micro-batch. Per-example importance weights or position-weighted tokens are not supported: the GNS "
            "would be silently wrong"
        )


def _short(values: torch.Tensor, shown: int = 6) -> str:
    text = ", ".join(f"{v:.4g}" for v in values[:shown].tolist())
    return f"[{text}{', ...' if values.numel() > shown else ''}]"
