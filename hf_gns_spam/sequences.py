"""Which sequence each token belongs to, read from what a model is called with.

In packed and padding-free batches (TRL's ``packing=True`` / ``padding_free=True``, transformers'
``DataCollatorWithFlattening``) several sequences lie end to end in one row, and transformers attends within each
of them. The boundaries come with the call, in this order of preference:

* ``cu_seq_lens_q`` ([E + 1] cumulative sequence lengths over the flattened tokens, flash-attention style);
* ``position_ids`` ([B, T]): a sequence starts at every token whose position is not its predecessor's + 1
  (and at the start of every row).

An example is then a sequence: :func:`sequence_ids` numbers the sequences 0 … E−1 in row-major order. A batch in
which every row is one sequence (the ordinary padded case, or no boundaries at all) gives None: dim 0 is the
example.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["sequence_ids"]


def sequence_ids(inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """[B, T] int64 sequence index of every token of a packed batch, or None if every row is one sequence."""
    reference = inputs.get("input_ids")
    if not isinstance(reference, torch.Tensor):
        reference = inputs.get("inputs_embeds")
    cumulative = inputs.get("cu_seq_lens_q")
    if isinstance(cumulative, torch.Tensor) and isinstance(reference, torch.Tensor) and cumulative.numel() > 2:
        lengths = cumulative.diff().long()
        ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        shape = reference.shape[:2]
        if ids.numel() != shape.numel():
            raise ValueError(
                f"cu_seq_lens_q covers {ids.numel()} tokens but the batch has {shape.numel()} ({tuple(shape)})"
            )
        return ids.reshape(shape)
    positions = inputs.get("position_ids")
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] < 2:
        return None
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    if not starts[:, 1:].any():  # one sequence per row (one host read per forward)
        return None
    return starts.flatten().cumsum(0).sub(1).reshape(positions.shape)
