"""StableSPAM on FSDP2 (``fully_shard``) parameters, 2 processes, gloo on CPU; driven by
tests/end_to_end/test_stable_spam_fsdp.py.

``python -m torch.distributed.run --nproc_per_node 2 tests/scripts/fsdp_stable_spam.py OUT_DIR [SETTING ...]``

A 3-layer MLP (40 → 112 → 64 → 1) with ``fully_shard`` on each layer and on the root, 5 steps on fixed global batches
of 16 examples (8 per rank), for several optimizer settings. Rank 0 also runs each setting in one process (no
sharding, the whole batch, the torch path) from the same initial weights. Sharding along dim 0 over 2 ranks:
fc1.weight (4480 elements, quantized at 8/4 bits) is cut at element 2240, which is not a multiple of either
quantization block (256, 128); fc2.weight (7168) at 3584, a multiple of both; fc3's weight and bias have one row, so
rank 1's shards of them are empty. For 8/4 bits rank 0 runs a second single-process reference whose quantization
blocks restart at the shard boundaries, as each rank's do.

Settings named ``*-triton`` run the fused Triton step on the CPU shards (Triton interpreter); ``*-resume-*`` settings
save after step 2, build a fresh model (other initial weights) and optimizer, load, and run steps 3-5: ``torch`` with
per-rank ``torch.save``/``torch.load(weights_only=True)`` of ``optimizer.state_dict()``, ``dcp`` with
``torch.distributed.checkpoint`` and ``get/set_optimizer_state_dict`` (sharded), ``full`` with full (gathered) state
dicts saved by rank 0, as accelerate's FULL_STATE_DICT does. Writes ``rank{r}.pt``.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton settings run the kernels on CPU tensors

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import hf_gns_spam.optim.stable_spam as stable_spam_module
from hf_gns_spam import StableSPAM
from hf_gns_spam.kernels.step_contract import STATE_FORMATS
from hf_gns_spam.optim.quantized_state import MIN_QUANTIZED_NUMEL, dequantize, quantize
from tests.support.processes import exit_distributed_script

STEPS = 5
SAVE_AFTER = 2
COMMON = {"lr": 1e-2, "reset_interval": 3, "weight_decay": 0.01, "total_steps": STEPS}
SETTINGS = {
    "32-clean": {"state_bits": 32, "mode": "clean"},
    "32-faithful": {"state_bits": 32, "mode": "faithful"},
    "16-clean": {"state_bits": 16, "mode": "clean"},
    "8-clean": {"state_bits": 8, "mode": "clean"},
    "4-faithful": {"state_bits": 4, "mode": "faithful"},
    "4-clean": {"state_bits": 4, "mode": "clean"},
    "32-clean-nan": {"state_bits": 32, "mode": "clean", "nan": True},
    "32-clean-triton": {"state_bits": 32, "mode": "clean", "triton": True},
    "8-clean-triton": {"state_bits": 8, "mode": "clean", "triton": True},
    "4-faithful-triton": {"state_bits": 4, "mode": "faithful", "triton": True},
    "8-clean-resume-torch": {"state_bits": 8, "mode": "clean", "resume": "torch"},
    "32-faithful-resume-dcp": {"state_bits": 32, "mode": "faithful", "resume": "dcp"},
    "4-faithful-resume-full": {"state_bits": 4, "mode": "faithful", "resume": "full"},
    "32-faithful-resume-full": {"state_bits": 32, "mode": "faithful", "resume": "full"},  # resumed by 1 process too
}
NAN_STEP, NAN_ROW, NAN_COLUMN = 3, 40, 7  # fc2.weight[40, 7], in rank 1's shard, gets a NaN gradient at step 3


def build_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(40, 112), torch.nn.Tanh(), torch.nn.Linear(112, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )


def sharded_model(seed: int = 0) -> torch.nn.Module:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = build_model(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    inputs = torch.randn(16, 40, generator=generator)
    return inputs, inputs[:, :8].sin().sum(1, keepdim=True)


def run_steps(model, optimizer, steps, rows: slice, inject_nan: bool, sharded: bool) -> list[int]:
    """Train on the global batches of ``steps`` (this process's ``rows``); returns the all-reduces per step."""
    collectives = []
    for step in steps:
        inputs, targets = global_batch(step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs[rows]), targets[rows]).backward()
        if inject_nan and step == NAN_STEP:
            grad = model[2].weight.grad
            local = grad.to_local() if sharded else grad
            first_row = 32 * dist.get_rank() if sharded else 0  # rank r holds rows 32r .. 32r + 31
            if 0 <= NAN_ROW - first_row < local.shape[0]:
                local[NAN_ROW - first_row, NAN_COLUMN] = float("nan")
        collectives.append(count_all_reduces(optimizer.step))
    return collectives


def count_all_reduces(function) -> int:
    """Call ``function`` and return how many ``torch.distributed.all_reduce`` calls it made."""
    calls = []
    all_reduce = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(kwargs.get("op"))
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting
    try:
        function()
    finally:
        dist.all_reduce = all_reduce
    return len(calls)


def state_summary(optimizer) -> list[dict[str, torch.Tensor]]:
    keys = ("clip_max_ema", "norm_ema", "norm_sq_ema", "nonfinite_grad_steps")
    return [{k: optimizer.state[p][k].clone() for k in keys} for g in optimizer.param_groups for p in g["params"]]


def resume(name: str, how: str, model, optimizer, kwargs: dict, out_dir: str):
    """Save model and optimizer after step SAVE_AFTER, load them into a fresh model (other weights) and optimizer."""
    rank = dist.get_rank()
    path = os.path.join(out_dir, f"{name}-rank{rank}.pt" if how == "torch" else name)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if how == "torch":
        saved = {"model": [p.to_local().clone() for p in model.parameters()], "optimizer": optimizer.state_dict()}
        torch.save(saved, path)
    elif how == "dcp":
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
            checkpoint_id=path,
        )
    else:
        saved = {
            "model": get_model_state_dict(model, options=full),
            "optim": get_optimizer_state_dict(model, optimizer, options=full),
        }
        if rank == 0:
            torch.save(saved, path)
    dist.barrier()
    model = sharded_model(seed=1)
    optimizer = StableSPAM(model.parameters(), **kwargs)
    if how == "torch":
        checkpoint = torch.load(path, weights_only=True)
        with torch.no_grad():
            for param, local in zip(model.parameters(), checkpoint["model"], strict=True):
                param.to_local().copy_(local)
        optimizer.load_state_dict(checkpoint["optimizer"])
    elif how == "dcp":
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
    else:
        checkpoint = torch.load(path, weights_only=True)
        set_model_state_dict(model, checkpoint["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, checkpoint["optim"], options=StateDictOptions(full_state_dict=True))
    return model, optimizer


def shard_block_quantization(model: torch.nn.Module, world_size: int):
    """quantize/dequantize that restart the blocks at the dim-0 shard boundaries of the model's quantized weights."""
    cuts = {}
    for param in model.parameters():
        if param.numel() >= MIN_QUANTIZED_NUMEL:
            rows, per_row = param.shape[0], param.numel() // param.shape[0]
            size = math.ceil(rows / world_size) * per_row
            cuts[param.numel()] = [min(size * r, param.numel()) for r in range(world_size + 1)]

    def pieces(numel):
        bounds = cuts[numel]
        return list(itertools.pairwise(bounds))

    def split_quantize(x, fmt):
        if x.numel() not in cuts:
            return quantize(x, fmt)
        parts = [quantize(x.reshape(-1)[start:stop], fmt) for start, stop in pieces(x.numel())]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def split_dequantize(indices, absmax, fmt, numel):
        if numel not in cuts:
            return dequantize(indices, absmax, fmt, numel)
        values, byte, block = [], 0, 0
        for start, stop in pieces(numel):
            n = stop - start
            n_bytes, n_blocks = fmt.indices_numel(n), fmt.absmax_numel(n)
            values.append(dequantize(indices[byte : byte + n_bytes], absmax[block : block + n_blocks], fmt, n))
            byte, block = byte + n_bytes, block + n_blocks
        return torch.cat(values)

    return split_quantize, split_dequantize


def run_setting(name: str, setting: dict, out_dir: str) -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = slice(8 * rank, 8 * rank + 8)
    kwargs = {**COMMON, "state_bits": setting["state_bits"], "mode": setting["mode"]}
    default_use_triton = stable_spam_module._use_triton
    if setting.get("triton"):
        stable_spam_module._use_triton = lambda param: True
    started = time.perf_counter()
    model = sharded_model()
    optimizer = StableSPAM(model.parameters(), **kwargs)
    if setting.get("resume"):
        collectives = run_steps(model, optimizer, range(1, SAVE_AFTER + 1), rows, False, True)
        model, optimizer = resume(name, setting["resume"], model, optimizer, kwargs, out_dir)
        collectives += run_steps(model, optimizer, range(SAVE_AFTER + 1, STEPS + 1), rows, False, True)
    else:
        collectives = run_steps(model, optimizer, range(1, STEPS + 1), rows, setting.get("nan", False), True)
    stable_spam_module._use_triton = default_use_triton
    result = {
        "fsdp": [p.full_tensor().detach().clone() for p in model.parameters()],
        "stats": state_summary(optimizer),
        "quantized": ["quantized_bits" in optimizer.state[p] for p in model.parameters()],
        "collectives_per_step": collectives,
        "seconds": time.perf_counter() - started,
    }
    if rank == 0:  # the single-process references (torch path)
        result["initial"] = [p.detach().clone() for p in build_model().parameters()]
        references = {"single": (quantize, dequantize)}
        if STATE_FORMATS[setting["state_bits"]].is_quantized:
            references["single_shard_blocks"] = shard_block_quantization(build_model(), world_size)
        for key, (quantize_fn, dequantize_fn) in references.items():
            stable_spam_module.quantize, stable_spam_module.dequantize = quantize_fn, dequantize_fn
            try:
                single = build_model()
                single_optimizer = StableSPAM(single.parameters(), **kwargs)
                run_steps(single, single_optimizer, range(1, STEPS + 1), slice(0, 16), setting.get("nan", False), False)
            finally:
                stable_spam_module.quantize, stable_spam_module.dequantize = quantize, dequantize
            result[key] = [p.detach().clone() for p in single.parameters()]
            result[key + "_stats"] = state_summary(single_optimizer)
    return result


def main() -> None:
    out_dir = sys.argv[1]
    selected = sys.argv[2:] or list(SETTINGS)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = {name: run_setting(name, SETTINGS[name], out_dir) for name in selected}
    results["world_size"] = dist.get_world_size()
    results["seconds"] = time.perf_counter() - started
    torch.save(results, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    main()
    exit_distributed_script()
