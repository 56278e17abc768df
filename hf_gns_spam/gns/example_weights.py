"""Each example's weight in the loss, observed from the loss the Trainer actually computed.

The gradient noise scale needs, for every example b of an optimizer step, the weight a_b with which example b's
own loss ℓ_b enters the loss that is back-propagated: L = Σ_b a_b·ℓ_b. It is not derived from the Trainer's code
paths; it is identified on every micro-batch it is asked about, from the loss value L that ``compute_loss``
returned and the outputs and labels it was computed on:

* the own losses: ℓ_b = s_b / n_b, the mean over example b's n_b label tokens (labels ≠ −100) of the per-token loss
  ``(1 − ε)·(−log p(y)) + ε·mean_v(−log p(v))`` (cross-entropy, with the Trainer's label smoothing ε), computed
  from the logits in float32, with and without the causal shift (``labels[:, 1:]`` against ``logits[:, :-1]``);
  from ``log_probs``/``label_mask`` for outputs that carry no logits (TRL's fused LM head); a classification
  model's ``[B, C]`` logits and ``[B]`` labels are one token per example;
* the candidate weightings, each with a factor c ∈ {1, P} (P = processes, which the Trainer multiplies by when it
  averages tokens across devices):

  ``tokens_over_batch``    a_b = c·n_b / N         N = ``num_items_in_batch``, the label tokens of the whole
                                                   accumulated batch (HF causal LM / seq2seq losses, label
                                                   smoothing, TRL's SFTTrainer)
  ``tokens_over_micro``    a_b = c·n_b / Σ n       a token mean over this micro-batch (no N passed)
  ``examples_over_micro``  a_b = c / B_micro       a mean over this micro-batch's examples (sequence
                                                   classification, which ignores N)

An example is a row of the batch, or a sequence of a packed batch (:mod:`hf_gns_spam.sequences`): its own loss
is then the mean over the label positions inside that sequence.

Every candidate that reproduces L to ``rtol`` is kept (at initialisation every example's loss is about log V, so
several weightings can match the value); if none does, :class:`ExampleWeightError` says what was observed and what
to do. The gradient observed at the logits in the same micro-batch's backward then picks the one weighting that
holds, or refuses them all (:mod:`hf_gns_spam.gns.logit_gradients`). Once confirmed, the weights of later
micro-batches follow from their labels alone (:func:`example_weights`), and are checked again every
``verify_interval`` steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from hf_gns_spam.errors import ExampleWeightError

__all__ = [
    "ExampleWeightError",
    "LabelPositions",
    "LossWeighting",
    "OwnLosses",
    "example_index",
    "example_weights",
    "identify_loss_weighting",
    "label_positions",
    "own_losses",
    "token_counts",
]

IGNORE_INDEX = -100
WeightingName = Literal["tokens_over_batch", "tokens_over_micro", "examples_over_micro"]
WEIGHTINGS: tuple[WeightingName, ...] = ("tokens_over_batch", "tokens_over_micro", "examples_over_micro")


@dataclass(frozen=True)
class OwnLosses:
    """Per-example own-loss sums s_e and label-token counts n_e (float32, [E]); ℓ_e = s_e / n_e."""

    sums: torch.Tensor
    tokens: torch.Tensor


@dataclass(frozen=True)
class LossWeighting:
    """How a loss weights its examples: the table's weighting, the factor c, and whether labels are shifted."""

    weighting: WeightingName
    factor: float
    shifted: bool

    def __str__(self) -> str:
        return (
            f"{self.weighting}{'' if self.factor == 1 else f' x{self.factor:g}'}{' (shifted)' if self.shifted else ''}"
        )


def example_index(labels: torch.Tensor, sequences: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """([B, T] example of every label position, E): the packed sequence if ``sequences`` (see
    :mod:`hf_gns_spam.sequences`) is given, else the row; [B] labels (classification) are one position each."""
    if sequences is not None:
        sequences = sequences.to(labels.device)
        return sequences, int(sequences.max()) + 1
    rows = torch.arange(labels.shape[0], device=labels.device)
    return rows.view(-1, *([1] * (labels.dim() - 1))).expand(labels.shape), labels.shape[0]


@dataclass(frozen=True)
class LabelPositions:
    """Every label position (label ≠ −100) of a [B, T] batch, in row-major order: its ``rows`` and ``positions``
    (in ``labels[:, 1:]`` when shifted: position t's label is predicted at t), its ``targets`` (the label) and
    ``owners`` (its example), and the number of ``examples`` E."""

    rows: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    owners: torch.Tensor
    examples: int


def label_positions(labels: torch.Tensor, shifted: bool, sequences: torch.Tensor | None = None) -> LabelPositions:
    """The label positions of ``labels`` (``labels[:, 1:]`` when shifted), their examples from
    :func:`example_index`; [B] labels (classification) are [B, 1], one position per example."""
    if labels.dim() == 1:
        labels, sequences = labels.unsqueeze(1), None
    index, examples = example_index(labels, sequences)
    targets, owners = (labels[:, 1:], index[:, 1:]) if shifted else (labels, index)
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return LabelPositions(rows, positions, targets[rows, positions], owners[rows, positions], examples)


def token_counts(labels: torch.Tensor, shifted: bool, sequences: torch.Tensor | None = None) -> torch.Tensor:
    """n_e: label tokens of each example (float32, [E]), counting ``labels[:, 1:]`` when shifted."""
    found = label_positions(labels, shifted, sequences)
    return torch.bincount(found.owners, minlength=found.examples).float()


def example_weights(tokens: torch.Tensor, weighting: LossWeighting, num_items_in_batch: Any) -> torch.Tensor:
    """a_e for one micro-batch, from its examples' label-token counts n_e (see the module's table)."""
    if weighting.weighting == "tokens_over_batch":
        if num_items_in_batch is None:
            raise ExampleWeightError(
                "the loss was identified as a token sum over num_items_in_batch, but this micro-batch came without "
                "num_items_in_batch"
            )
        total = torch.as_tensor(num_items_in_batch).to(tokens).reshape(-1)[0]
        weights = tokens / total
    elif weighting.weighting == "tokens_over_micro":
        weights = tokens / tokens.sum().clamp_min(1.0)
    else:
        weights = torch.where(tokens > 0, 1.0 / tokens.numel(), 0.0)
    return weighting.factor * weights


TOKEN_CHUNK = 1024  # label positions whose log-softmax is taken at once (bounds the memory: chunk x vocabulary)


def _grouped_token_losses(
    logits: torch.Tensor, labels: torch.Tensor, shifted: bool, smoothing: float, sequences: torch.Tensor | None
) -> OwnLosses:
    """s_e and n_e from logits [B, T, V] and labels [B, T], the logits at t predicting labels[:, t + 1] when
    ``shifted``; per-token losses in float32, TOKEN_CHUNK positions at a time, summed per example."""
    found = label_positions(labels, shifted, sequences)
    flat = logits.reshape(-1, logits.shape[-1])  # [B·T, V]
    predicting = found.rows * logits.shape[1] + found.positions  # the logits row of each label position
    sums = torch.zeros(found.examples, dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for chunk in torch.arange(found.rows.numel(), device=found.rows.device).split(TOKEN_CHUNK):
            neg_log_probs = -torch.log_softmax(flat[predicting[chunk]].float(), dim=-1)
            wanted = found.targets[chunk].to(logits.device)
            per_token = neg_log_probs.gather(-1, wanted.unsqueeze(-1)).squeeze(-1)
            if smoothing:
                per_token = (1.0 - smoothing) * per_token + smoothing * neg_log_probs.mean(-1)
            sums.index_add_(0, found.owners[chunk].to(logits.device), per_token)
    tokens = torch.bincount(found.owners, minlength=found.examples).float().to(logits.device)
    return OwnLosses(sums, tokens)


def own_losses(
    outputs: Any, labels: torch.Tensor, shifted: bool, smoothing: float, sequences: torch.Tensor | None = None
) -> OwnLosses | None:
    """The examples' own losses from a model's outputs, or None if the outputs do not allow it."""
    get = outputs.get if isinstance(outputs, Mapping) else (lambda key: getattr(outputs, key, None))
    logits = get("logits")
    if isinstance(logits, torch.Tensor):
        if logits.dim() == 2 and labels.dim() == 1 and not shifted:  # classification: one "token" per example
            return _grouped_token_losses(logits.unsqueeze(1), labels.unsqueeze(1), False, smoothing, None)
        if logits.dim() == labels.dim() + 1 and logits.shape[:2] == labels.shape[:2]:
            return _grouped_token_losses(logits, labels.to(logits.device), shifted, smoothing, sequences)
        return None
    log_probs, label_mask = get("log_probs"), get("label_mask")
    if isinstance(log_probs, torch.Tensor) and isinstance(label_mask, torch.Tensor) and not smoothing:
        # TRL's fused LM head: log p of each label position (zero where ignored), already aligned with the
        # shifted labels when it is one position shorter than them
        index, examples = example_index(labels, sequences)
        owner = index[:, 1:] if log_probs.shape[1] == labels.shape[1] - 1 else index
        if owner.shape != log_probs.shape:
            return None
        owner = owner.to(log_probs.device)
        with torch.no_grad():
            sums = torch.zeros(examples, device=log_probs.device).index_add_(
                0, owner.flatten(), -(log_probs.float() * label_mask).flatten()
            )
            tokens = torch.zeros(examples, device=log_probs.device).index_add_(
                0, owner.flatten(), label_mask.float().flatten()
            )
        return OwnLosses(sums, tokens)
    return None


def identify_loss_weighting(
    loss: torch.Tensor,
    outputs: Any,
    labels: torch.Tensor,
    labels_are_shifted: bool,
    num_items_in_batch: Any,
    processes: int,
    smoothing: float = 0.0,
    sequences: torch.Tensor | None = None,
    rtol: float = 2e-3,
) -> list[LossWeighting]:
    """The weightings among the module's table with which Σ_e a_e·ℓ_e reproduces the observed ``loss``, in the
    table's order, all with the same shift (the first shift that matches).

    ``labels`` are the labels the loss was computed on (``shift_labels`` with ``labels_are_shifted=True``: they
    are never shifted again); ``sequences`` the packed sequences' ids (examples are then sequences). Raises
    :class:`ExampleWeightError` when none does.
    """
    observed = float(loss.detach().float())
    shifts = (False,) if labels_are_shifted or labels.dim() < 2 else (True, False)
    tried: list[str] = []
    for shifted in shifts:
        matching = []
        losses = own_losses(outputs, labels, shifted, smoothing, sequences)
        if losses is None or not torch.equal(losses.tokens.cpu(), token_counts(labels, shifted, sequences).cpu()):
            continue
        per_example = torch.where(losses.tokens > 0, losses.sums / losses.tokens.clamp_min(1.0), 0.0)
        for name in WEIGHTINGS:
            for factor in dict.fromkeys((1.0, float(processes))):
                weighting = LossWeighting(name, factor, shifted)
                if name == "tokens_over_batch" and num_items_in_batch is None:
                    continue
                tried.append(str(weighting))
                weights = example_weights(losses.tokens, weighting, num_items_in_batch)
                reconstructed = float((weights * per_example).sum())
                if abs(reconstructed - observed) <= rtol * max(abs(observed), 1e-6):
                    matching.append(weighting)
        if matching:
            return matching
    raise ExampleWeightError(
        f"GNSCallback could not tell how this loss ({observed:.6g}) weights its examples: it is none of "
        f"[{', '.join(tried) or 'no candidate: the outputs carry no logits or log_probs for these labels'}] of the "
        "examples' own mean cross-entropy over their label tokens (module hf_gns_spam.gns.example_weights). The "
        "gradient noise scale needs each example's weight in the loss: use the model's own loss or the Trainer's "
        "label smoothing, or make compute_loss_func return a token sum divided by num_items_in_batch (or a mean "
        "over the micro-batch's tokens or examples) of the cross-entropy."
    )
