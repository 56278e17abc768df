"""Batch-size schedules in a real Trainer, every optimizer step audited: :func:`run` builds the Trainer (a patched
model, the callback under test and a :class:`StepAuditor`), :func:`rows` lists the rows of recorded micro-batches."""

from __future__ import annotations

import copy

import torch
from transformers import Trainer, TrainerCallback

from hf_gns_spam import GNSCallback, patch_model, unpatch_model
from tests.support import model_zoo
from tests.support.data import padded_dataset
from tests.support.references import token_losses
from tests.support.trainers import training_args


class StepAuditor(TrainerCallback):
    """Records the micro-batches of every optimizer step and checks each step's gradient against a recomputation:
    the gradient of Σ token losses / (label tokens) over exactly those micro-batches, on a copy of the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.pending: list[dict[str, torch.Tensor]] = []
        self.steps: list[list[dict[str, torch.Tensor]]] = []
        self.max_relative_error = 0.0
        self.learning_rates: list[float] = []
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if torch.is_grad_enabled():  # without labels (a compute_loss_func pops them) there is nothing to audit
            self.pending.append({k: kwargs.get(k) for k in ("input_ids", "attention_mask", "labels")})

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        micro_batches, self.pending = self.pending, []
        self.steps.append(micro_batches)
        self.learning_rates.append(optimizer.param_groups[0]["lr"])
        if any(m["labels"] is None for m in micro_batches):
            return
        reference = copy.deepcopy(model)
        reference._forward_pre_hooks.clear()  # the copy must not record (nor count) its own forwards
        unpatch_model(reference)  # the original norms: an independent computation (and no statistics)
        reference.zero_grad(set_to_none=True)
        tokens = sum((m["labels"][:, 1:] != -100).sum() for m in micro_batches)
        for m in micro_batches:
            logits = reference(input_ids=m["input_ids"], attention_mask=m["attention_mask"]).logits
            (token_losses(logits, m["labels"]).sum() / tokens).backward()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            error = ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item()
            self.max_relative_error = max(self.max_relative_error, error)


def run(tmp_path, callback: GNSCallback, dataset=None, model=None, trainer_kwargs=None, **overrides):
    """(a Trainer not yet trained, its StepAuditor): a patched ``model`` (a LLaMA by default) with ``callback``, on
    ``dataset`` (24 padded rows by default), micro-batches of 1, StableSPAM with a cosine schedule (``overrides`` on
    top)."""
    model = model or model_zoo.build("llama")
    patch_model(model)
    auditor = StepAuditor(model)
    settings = {
        "per_device_train_batch_size": 1,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1,
        "max_grad_norm": 0.0,
        **overrides,
    }
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, **settings),
        train_dataset=dataset if dataset is not None else padded_dataset(size=24),
        callbacks=[callback, auditor],
        **(trainer_kwargs or {}),
    )
    return trainer, auditor


def rows(micro_batches):
    """The token ids of every row of ``micro_batches``, in order, as tuples."""
    return [tuple(r.tolist()) for m in micro_batches for r in m["input_ids"]]
