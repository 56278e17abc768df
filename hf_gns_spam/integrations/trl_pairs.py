"""TRL's preference trainers, whose examples are pairs of rows.

``trl.DPOTrainer`` (trl 1.x, ``dpo_trainer.py``, ``_compute_loss``: "batch is [chosen, rejected]") and
``trl.RewardTrainer`` (``reward_trainer.py``, ``compute_loss``: ``torch.chunk(..., chunks=2)``) run one forward over
a micro-batch of 2P rows, the P chosen sequences then the P rejected ones, and reduce a loss ℓ_i of each pair (a
function of both its rows: the DPO losses of the policy's and the reference's log-ratios; −log σ(r_chosen −
r_rejected), with its margin and reward centring, for the reward model) by a mean over the P pairs:

    L = (1/P) Σ_i ℓ_i,   so an example is a pair i = (row i, row i + P), and its weight in L is a_i = 1/P.

Its gradient is the sum of its two rows' contributions, so the norms' statistics are taken per pair
(:func:`hf_gns_spam.patching.set_paired_rows`). Losses that are not such a mean are refused: DPO's ``"sft"`` loss
type (a token mean over the chosen rows), and a mixture-of-experts auxiliary loss (a mean over the micro-batch's
tokens routed, not a sum over pairs). This layout and reduction are TRL's, read from its code, not observed: the
trainers are recognised by class, and :func:`check_paired_trainer` fails loudly where its options leave them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_paired_trainer", "is_paired_trainer"]

PAIRED_TRAINERS = ("DPOTrainer", "RewardTrainer")


def is_paired_trainer(trainer: Any) -> bool:
    """Whether ``trainer`` is (a subclass of) TRL's DPOTrainer or RewardTrainer."""
    return any(
        cls.__name__ in PAIRED_TRAINERS and cls.__module__.split(".")[0] == "trl" for cls in type(trainer).__mro__
    )


def check_paired_trainer(trainer: Any) -> None:
    """Refuse the options under which the loss is not a mean over pairs of per-pair losses (module docstring)."""
    loss_types = getattr(trainer, "loss_types", None) or []
    if "sft" in loss_types:
        raise ValueError(
            f"GNSCallback cannot weigh the examples of DPO's loss_type={list(loss_types)}: the 'sft' loss is a token "
            "mean over the chosen rows, not a mean over pairs, so the pairs' weights would be silently wrong. Leave "
            "'sft' out of loss_type (or train without GNSCallback)"
        )
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError(
            "GNSCallback cannot weigh the examples of a loss with a mixture-of-experts auxiliary loss "
            "(router_aux_loss_coef ≠ 0): it is not a sum of per-pair losses. Set router_aux_loss_coef=0"
        )
