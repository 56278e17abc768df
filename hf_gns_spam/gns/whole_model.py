"""Per-example gradients of every trainable parameter, recomputed on an optimizer step's own examples.

The diagnostic behind ``GNSCallback(validate_every=N)``: the normalization layers' GNS is a proxy for the whole
model's (Gray et al. 2024); on a validation step this module recomputes, for each example e of the step, the
gradient g_e of its own loss ℓ_e with respect to ALL trainable parameters, and returns the weighted sum of squares

    Σ_e α_e² ‖g_e‖²

(α_e: the example's weight in the loss that was back-propagated, as the callback observed it), from which the
callback forms the whole model's ``small`` exactly as it does for the norms; the same sum restricted to named
groups of the parameters comes from the same gradients (the norms' share, and the whole model without its
embeddings).

The embeddings (:func:`embedding_parameters`) are the ``weight`` of every ``nn.Embedding`` module of the model (the
token embeddings, and learned position embeddings such as GPT-2's ``wpe``) and the parameters of
``model.get_output_embeddings()`` where the model has one (the LM head, tied or not; a tied head is the same
Parameter as the token embeddings and is counted once). The whole model's GNS is reported with and without them:
the reference implementation of Gray et al. (nanoGNS) leaves the tied embeddings out of its total, and in small
language models the embeddings raise the whole model's GNS by a factor of about 1.5–2 over most of a run
(``benchmarks/gns_fidelity.py``).

The own loss ℓ_e is the one :mod:`hf_gns_spam.gns.example_weights` identified the loss as a weighted sum of: the
mean over example e's label tokens of ``(1 − ε)·(−log p(y)) + ε·mean_v(−log p(v))`` (the Trainer's label
smoothing ε), with the causal shift when the identified weighting has it; a classification model's cross-entropy
of its ``[B, C]`` logits.

How, without disturbing training:

* one forward per row of each micro-batch (the row alone: its input tensors sliced to ``[r:r+1]``, the labels left
  out of the call), then one ``torch.autograd.grad`` per example in that row (one per row, several for a packed
  row) with respect to detached leaf copies of the trainable parameters swapped in with
  ``torch.func.functional_call``: the parameters' ``.grad`` are never written, no hook registered on a parameter
  (DDP's, a user's) fires, and the patched norms' statistics, which accumulate through the ``.grad`` of their
  statistics leaf, are not touched (``autograd.grad`` accumulates into no leaf);
* the model's train/eval mode is left as it is (dropout, if any, draws its masks as in training), under a forked
  RNG: the CPU and the device generators are restored afterwards, so the run's random stream is unchanged;
* nothing is cast or copied: the leaves share the parameters' storage (read only), so the memory is one example's
  activations and one gradient of the trainable parameters at a time.

Cost per validation step: one extra forward and backward of one example per example of the step (per row of the
step's micro-batches; a packed row is one forward and one backward per sequence in it), at batch size 1. Not
supported: FSDP (sharded parameters), reentrant gradient checkpointing (``autograd.grad`` refuses it; use
``gradient_checkpointing_kwargs={"use_reentrant": False}``), a batch with ``cu_seq_lens_q`` and several rows,
outputs without logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from hf_gns_spam.errors import WholeModelError
from hf_gns_spam.gns.example_weights import IGNORE_INDEX, example_index

__all__ = [
    "StoredMicroBatch",
    "WholeModelError",
    "embedding_parameters",
    "squared_gradient_norm",
    "weighted_squared_norms",
]

LABEL_KEYS = ("labels", "shift_labels")
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class StoredMicroBatch:
    """One micro-batch of a validation step, as the loss saw it (tensors detached, on their device).

    ``labels`` are the labels the loss was computed on (``shift_labels`` when given), ``sequences`` the packed
    sequences' ids (None: every row is one example), ``tokens`` n_e, ``weights`` α_e (set at the backward)."""

    inputs: dict[str, Any]
    labels: torch.Tensor
    sequences: torch.Tensor | None
    tokens: torch.Tensor
    weights: torch.Tensor | None = None


def _model_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The forward's keyword arguments: the micro-batch without its labels (an encoder-decoder model without
    decoder inputs keeps them: it builds its decoder inputs from them)."""
    config = getattr(model, "config", None)
    needs_labels = bool(getattr(config, "is_encoder_decoder", False)) and not any(
        key in inputs for key in ("decoder_input_ids", "decoder_inputs_embeds")
    )
    return {k: v for k, v in inputs.items() if needs_labels or k not in LABEL_KEYS}


def _rows(inputs: dict[str, Any], rows: int) -> Iterable[dict[str, Any]]:
    if rows == 1:
        yield inputs
        return
    if any(isinstance(inputs.get(key), torch.Tensor) for key in PACKED_KEYS):
        raise WholeModelError(
            f"validate_every cannot split a micro-batch of {rows} rows with cu_seq_lens_q (flattened sequences "
            "in several rows) into its rows"
        )
    for r in range(rows):
        yield {
            k: v[r : r + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v
            for k, v in inputs.items()
        }


def _logits(outputs: Any) -> torch.Tensor:
    get = outputs.get if isinstance(outputs, Mapping) else (lambda key: getattr(outputs, key, None))
    logits = get("logits")
    if not isinstance(logits, torch.Tensor):
        raise WholeModelError("validate_every needs the model's logits (its outputs have none)")
    return logits


def _own_losses(
    logits: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor, shifted: bool, smoothing: float, examples: int
) -> torch.Tensor:
    """Differentiable Σ over each example's label positions of its per-token loss ([E], float32), for one row:
    logits [1, T, V] (or [1, C]), labels and owner [1, T] (or [1])."""
    if logits.dim() == 2 and labels.dim() == 1:  # classification: one "token" per example
        logits, labels, owner = logits.unsqueeze(1), labels.unsqueeze(1), owner.unsqueeze(1)
    labels, owner = labels.to(logits.device), owner.to(logits.device)
    if shifted:
        logits, labels, owner = logits[:, :-1], labels[:, 1:], owner[:, 1:]
    if logits.shape[:2] != labels.shape[:2]:
        raise WholeModelError(
            f"validate_every cannot match logits of shape {tuple(logits.shape)} to labels of shape "
            f"{tuple(labels.shape)}"
        )
    valid = labels != IGNORE_INDEX
    neg_log_probs = -torch.log_softmax(logits[valid].float(), dim=-1)  # [N, V]
    per_token = neg_log_probs.gather(-1, labels[valid].unsqueeze(-1)).squeeze(-1)
    if smoothing:
        per_token = (1.0 - smoothing) * per_token + smoothing * neg_log_probs.mean(-1)
    return torch.zeros(examples, dtype=torch.float32, device=logits.device).index_add(0, owner[valid], per_token)


def _rng_fork(device: torch.device):
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else getattr(torch, device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def weighted_squared_norms(
    model: nn.Module,
    micro_batches: list[StoredMicroBatch],
    shifted: bool,
    smoothing: float = 0.0,
    groups: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """Σ_e α_e²‖g_e‖² over every example of ``micro_batches`` (float64, 0-dim, on the model's device), for all
    trainable parameters (key ``"all"``) and for each named group of parameter names in ``groups``.

    g_e is the gradient of example e's own loss with respect to the trainable parameters of ``model`` at their
    current values (see the module docstring); examples with α_e = 0 or no label token are left out.
    """
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise WholeModelError("validate_every found no trainable parameter")
    if any(isinstance(p, DTensor) for p in trainable.values()):
        raise WholeModelError(
            "validate_every does not work with sharded parameters (FSDP): the per-example gradients need the "
            "whole parameters on every process"
        )
    names = list(trainable)
    members = {key: [i for i, n in enumerate(names) if n in set(group)] for key, group in (groups or {}).items()}
    device = next(iter(trainable.values())).device
    sums = {key: torch.zeros((), dtype=torch.float64, device=device) for key in ("all", *members)}
    leaves = {name: p.detach().requires_grad_(True) for name, p in trainable.items()}
    inputs_list = list(leaves.values())
    with _rng_fork(device), torch.enable_grad():
        for micro in micro_batches:
            if micro.weights is None:
                raise WholeModelError("a micro-batch of the validation step had no backward")
            weights = micro.weights.double().tolist()
            tokens = micro.tokens.tolist()
            index, examples = example_index(micro.labels, micro.sequences)
            rows = micro.labels.shape[0]
            for r, row_inputs in enumerate(_rows(_model_inputs(model, micro.inputs), rows)):
                row_owner = index[r : r + 1]
                wanted = sorted({int(e) for e in row_owner.unique().tolist()})
                wanted = [e for e in wanted if weights[e] != 0.0 and tokens[e] > 0]
                if not wanted:
                    continue
                outputs = torch.func.functional_call(model, leaves, args=(), kwargs=row_inputs, strict=False)
                losses = _own_losses(_logits(outputs), micro.labels[r : r + 1], row_owner, shifted, smoothing, examples)
                for i, e in enumerate(wanted):
                    try:
                        grads = torch.autograd.grad(
                            losses[e] / tokens[e], inputs_list, retain_graph=i + 1 < len(wanted), allow_unused=True
                        )
                    except RuntimeError as error:
                        if "heckpoint" in str(error):
                            raise WholeModelError(
                                "validate_every needs gradients through torch.autograd.grad, which reentrant "
                                "gradient checkpointing refuses: use gradient_checkpointing_kwargs="
                                '{"use_reentrant": False}'
                            ) from error
                        raise
                    squares = torch.stack(
                        [
                            torch.zeros((), device=device) if g is None else g.float().square().sum().to(device)
                            for g in grads
                        ]
                    ).double()
                    scale = weights[e] ** 2
                    sums["all"] += scale * squares.sum()
                    for key, positions in members.items():
                        if positions:
                            sums[key] += scale * squares[positions].sum()
                del outputs, losses
    return sums


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's embeddings, each Parameter once: the ``weight`` of every ``nn.Embedding`` module and the
    parameters of ``model.get_output_embeddings()`` when the model has one (the LM head, tied or not)."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding) and isinstance(module.weight, nn.Parameter):
            found.setdefault(id(module.weight), module.weight)
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    if isinstance(head, nn.Module):
        for parameter in head.parameters():
            found.setdefault(id(parameter), parameter)
    return list(found.values())


def squared_gradient_norm(model: nn.Module, exclude: Iterable[nn.Parameter] = ()) -> torch.Tensor | None:
    """‖G‖² of the accumulated gradient of every trainable parameter not in ``exclude`` (float32, 0-dim, on the
    first gradient's device; 0 when every parameter with a gradient is excluded), None without gradients."""
    with_grad = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not with_grad:
        return None
    if any(isinstance(p.grad, DTensor) for p in with_grad):
        raise WholeModelError("validate_every does not work with sharded gradients (FSDP)")
    device = with_grad[0].grad.device
    excluded = {id(p) for p in exclude}
    squares = [p.grad.float().square().sum().to(device) for p in with_grad if id(p) not in excluded]
    return torch.stack(squares).sum() if squares else torch.zeros((), device=device)
