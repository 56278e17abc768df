"""The norms' statistics under FSDP2 (``fully_shard``, DTensor parameters; torchrun, gloo, CPU) equal one process's,
over all norms and per norm group (the sums behind ``gns/<group>``).

The Trainer cannot drive FSDP2 on CPU (accelerate ignores FSDP without GPUs), so the script shards the model with
``fully_shard`` directly and measures what GNSCallback measures."""

from __future__ import annotations

import pytest
import torch

from hf_gns_spam import patch_model, per_example_grad_stats
from hf_gns_spam.gns.arguments import NORM_GROUPS
from tests.support import model_zoo
from tests.support.model_zoo import EXPECTED_GROUPS
from tests.support.paths import TEST_SCRIPTS
from tests.support.processes import run_torchrun
from tests.support.references import token_losses

SCRIPT = TEST_SCRIPTS / "fsdp_gns_statistics.py"


@pytest.mark.slow
@pytest.mark.parametrize("norms", ["trained", "frozen"])
def test_fsdp2_statistics_and_sharded_gradient_norm_equal_one_process(tmp_path, norms):
    """Trained norms: their gradients are DTensor shards summed over the processes. Frozen norms (LoRA): their
    sinks are local, full and averaged over the processes. Both give one process's statistics and ‖G‖²."""
    run_torchrun([str(SCRIPT), str(tmp_path), norms], outputs=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    model = model_zoo.build("llama")
    patch_model(model)
    batch = model_zoo.batch("llama", batch_size=4)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    (token_losses(logits, batch["labels"]).sum() / (batch["labels"][:, 1:] != -100).sum()).backward()
    expected = {n: (float(s.sum_sq), float(s.count)) for n, s in per_example_grad_stats(model).items()}
    big = sum(float(p.grad.square().sum()) for n, p in model.named_parameters() if n in expected)

    if norms == "trained":
        assert ranks[0]["replicated"] == 0.0  # every norm gradient is a shard
    else:
        assert ranks[0]["replicated"] == ranks[1]["replicated"] == pytest.approx(big, rel=1e-5)  # the averaged sinks
    # per norm group: the groups by the architecture's names, each group's Σ_b ‖G_b‖² and ‖G‖² as one process's
    groups = {n: EXPECTED_GROUPS["llama"][n.rpartition(".")[0]] for n in expected}
    assert ranks[0]["groups"] == ranks[1]["groups"] == groups
    grads = {n: p.grad for n, p in model.named_parameters() if n in expected}
    for group in NORM_GROUPS:
        names = [n for n, g in groups.items() if g == group]
        group_big = sum(float(grads[n].square().sum()) for n in names)
        assert ranks[0]["group_big"][group] == ranks[1]["group_big"][group] == pytest.approx(group_big, rel=1e-5)
        measured = sum(rank["stats"][n][0] for rank in ranks for n in names) / 4
        assert measured == pytest.approx(sum(expected[n][0] for n in names), rel=1e-5), group
    assert ranks[0]["big"] == ranks[1]["big"] == pytest.approx(big, rel=1e-5)
    for name, (sum_sq, count) in expected.items():
        # each rank measured its 2 examples, weighted x2 (FSDP2 averages the 2 ranks' gradients): sum / 2² = one run
        measured = sum(rank["stats"][name][0] for rank in ranks) / 4
        assert sum(rank["stats"][name][1] for rank in ranks) == count == 4
        assert measured == pytest.approx(sum_sq, rel=1e-5), name
