"""Run by tests/end_to_end/test_gns_fsdp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): a patched tiny LLaMA
sharded with FSDP2's ``fully_shard`` (DTensor parameters), one backward of each rank's half of a batch, and the
statistics the GNS needs written to OUTPUT_DIR/rank{R}.pt: the per-example statistics of the norms (local), ‖G‖² of
the norms' sharded gradient as GNSCallback measures it (its local shard part, summed over the ranks here), the same
per norm group, and the group GNSCallback put each norm parameter in."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hf_gns_spam import GNSCallback, patch_model, per_example_grad_stats
from hf_gns_spam.gns.arguments import NORM_GROUPS
from tests.support import model_zoo
from tests.support.processes import exit_distributed_script
from tests.support.references import token_losses


def main() -> None:
    output_dir, frozen = Path(sys.argv[1]), sys.argv[2:] == ["frozen"]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = model_zoo.build("llama")
    patch_model(model)
    if frozen:  # as peft's LoRA leaves them: the gradients go to the norms' sinks
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("norm" not in name)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    batch = model_zoo.batch("llama", batch_size=4)
    mine = {k: v[rank * 2 : (rank + 1) * 2] for k, v in batch.items()}
    tokens = (batch["labels"][:, 1:] != -100).sum()  # all ranks' label tokens
    logits = model(input_ids=mine["input_ids"], attention_mask=mine["attention_mask"], use_cache=False).logits
    # FSDP2 averages the gradients over the ranks: × world makes the step's gradient Σ token losses / tokens
    (token_losses(logits, mine["labels"]).sum() / tokens * world).backward()
    callback = GNSCallback()

    def mean_over_processes(tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "mean"
        dist.all_reduce(tensor)
        return tensor / world

    accelerator = SimpleNamespace(num_processes=world, device=torch.device("cpu"), reduce=mean_over_processes)
    callback._trainer = SimpleNamespace(model=model, accelerator=accelerator)
    callback.before_clipping(callback._trainer)
    shards = callback.step.big_shards.clone()
    dist.all_reduce(shards)
    group_shards = callback.step.group_big_shards.clone()  # per norm group, in NORM_GROUPS order
    dist.all_reduce(group_shards)
    group_big = dict(zip(NORM_GROUPS, (callback.step.group_big + group_shards).tolist(), strict=True))
    stats = {n: (float(s.sum_sq), float(s.count)) for n, s in per_example_grad_stats(model).items()}
    torch.save(
        {
            "stats": stats,
            "big": float(callback.step.big) + float(shards),
            "replicated": float(callback.step.big),
            "group_big": group_big,
            "groups": dict(callback._groups_of(stats)),  # statistics key -> its norm group
        },
        output_dir / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
    exit_distributed_script()
