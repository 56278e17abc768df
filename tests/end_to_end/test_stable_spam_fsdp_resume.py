"""A StableSPAM state saved by 2 FSDP2 processes, resumed by one process without FSDP.

The 2-process run (tests/scripts/fsdp_stable_spam.py, ``*-resume-full``) saves full (gathered) model and optimizer
state dicts after step 2, as accelerate's FULL_STATE_DICT does. One process loads them into an unsharded model and a
fresh StableSPAM (``set_optimizer_state_dict``, full state dict) and runs steps 3-5 on the whole batch:

* 32 bits: it ends where the uninterrupted single-process run ends (within the 2-process run's own 1e-4 of the
  displacement: the ranks reduce in another order);
* 4 bits: each rank quantized its shard in blocks of its own (one row per shard), which one process cannot take as
  its own layout; the load is refused, naming the sharding and world size, before anything is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

from hf_gns_spam import StableSPAM
from tests.support.paths import TEST_SCRIPTS
from tests.support.processes import run_torchrun

SCRIPT = TEST_SCRIPTS / "fsdp_stable_spam.py"
SETTINGS = ("32-faithful-resume-full", "4-faithful-resume-full")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the script's module, the output folder, rank 0's results) of one 2-process run of both settings."""
    out = tmp_path_factory.mktemp("fsdp_resume")
    run_torchrun([str(SCRIPT), str(out), *SETTINGS], outputs=out, environment={"TRITON_INTERPRET": "1"})
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import fsdp_stable_spam as script
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return script, out, torch.load(out / "rank0.pt", weights_only=False)


def one_process(script, path: Path, state_bits: int):
    """An unsharded model with the saved weights and a fresh StableSPAM given the saved state."""
    checkpoint = torch.load(path, weights_only=True)
    model = script.build_model(seed=1)
    model.load_state_dict(checkpoint["model"])
    setting = script.SETTINGS[path.name]
    optimizer = StableSPAM(model.parameters(), **{**script.COMMON, "state_bits": state_bits, "mode": setting["mode"]})
    set_optimizer_state_dict(model, optimizer, checkpoint["optim"], options=StateDictOptions(full_state_dict=True))
    return model, optimizer


def test_a_32_bit_state_of_two_processes_resumes_in_one(saved):
    script, out, rank0 = saved
    model, optimizer = one_process(script, out / "32-faithful-resume-full", 32)
    script.run_steps(model, optimizer, range(script.SAVE_AFTER + 1, script.STEPS + 1), slice(0, 16), False, False)
    reference = rank0["32-faithful-resume-full"]
    for resumed, single, initial in zip(model.parameters(), reference["single"], reference["initial"], strict=True):
        assert ((resumed - single).abs().max() / (single - initial).abs().max()).item() < 1e-4


def test_a_4_bit_state_of_two_processes_is_refused_in_one_naming_the_world_size(saved):
    script, out, _ = saved
    with pytest.raises(ValueError, match="the same sharding and world size"):
        one_process(script, out / "4-faithful-resume-full", 4)
