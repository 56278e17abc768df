"""The Trainer's training forwards of a model, recorded with a forward pre-hook (what the tests recompute from)."""

from __future__ import annotations

from typing import Any

import torch

MICRO_BATCH_KEYS = ("input_ids", "attention_mask", "labels")


class TrainingForwards:
    """Records every forward of ``model`` with gradients enabled (the Trainer's training micro-batches; no-grad
    recomputations are left out) and, with ``labelled``, only those given labels (the whole-model validation
    recomputes without them): ``forwards``, the keyword tensors ``keys`` (all keyword tensors when None), and
    ``num_items``, the ``num_items_in_batch`` each was given (None where it was not). ``remove()`` ends the
    recording."""

    def __init__(self, model: torch.nn.Module, keys: tuple[str, ...] | None = MICRO_BATCH_KEYS, labelled: bool = True):
        self.keys, self.labelled = keys, labelled
        self.forwards: list[dict[str, torch.Tensor]] = []
        self.num_items: list[float | None] = []
        self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled() or (self.labelled and "labels" not in kwargs):
            return
        keys = self.keys or [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        self.forwards.append({k: kwargs[k] for k in keys})
        items = kwargs.get("num_items_in_batch")
        self.num_items.append(None if items is None else float(items))

    def batch(self, first: int = 0) -> dict[str, torch.Tensor]:
        """The recorded forwards from the ``first`` on, concatenated into one batch."""
        forwards = self.forwards[first:]
        return {k: torch.cat([f[k] for f in forwards]) for k in forwards[0]}

    def remove(self) -> None:
        self._hook.remove()
