"""Stable-SPAM with 32-, 16-, 8- and 4-bit moments: optimizer memory per parameter and training quality.

Memory: bytes of optimizer state per trainable parameter, measured from the state tensors after one step, for a
LLaMA-style layer stack, against bitsandbytes' AdamW8bit (its ``state1``/``state2``/``absmax`` tensors) and, where
torchao is installed, torchao's 8- and 4-bit AdamW (what ``adamw_torch_8bit``/``adamw_torch_4bit`` use).

Quality: a byte-level LLaMA (hidden 128, 4 layers) trained for a few hundred steps on the Python standard
library's own source files (a real text corpus on every machine), the same seed and data for every variant; the
table gives the final training loss (mean of the last 20 steps) and its ratio to 32-bit states.

    python benchmarks/quantized_states.py [--steps 300] [--v-map-ablation]

``--v-map-ablation`` also trains 4-bit states whose second-moment map has a zero point (a linear map 0, 1/15, ...,
1) instead of the package's map without one (1/16, ..., 1), to show why the package excludes zero (Li et al. 2023).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sysconfig
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_gns_spam import StableSPAM
from hf_gns_spam.kernels.step_contract import STATE_FORMATS


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's .py files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def build_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really stores; a tensor subclass (torchao's quantized states) by its inner tensors."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(storage_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def state_bytes_per_parameter(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    total = sum(storage_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return total / sum(p.numel() for p in params)


def memory_table() -> None:
    params_shapes = [(1024, 1024)] * 4 + [(2752, 1024)] * 2 + [(1024, 2752)] + [(1024,)] * 2
    rows = []
    builders = {f"stable_spam state_bits={b}": (lambda ps, b=b: StableSPAM(ps, state_bits=b)) for b in STATE_FORMATS}
    try:
        import bitsandbytes

        builders["bitsandbytes AdamW8bit"] = lambda ps: bitsandbytes.optim.AdamW8bit(ps)
    except ImportError:
        pass
    try:
        from torchao.optim import AdamW4bit, AdamW8bit

        builders["torchao AdamW8bit"] = lambda ps: AdamW8bit(ps)
        builders["torchao AdamW4bit"] = lambda ps: AdamW4bit(ps)
    except ImportError:
        print("torchao not installed: its 8/4-bit AdamW are left out\n")
    for name, build in builders.items():
        params = [torch.zeros(s, requires_grad=True) for s in params_shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        try:
            optimizer = build(params)
            optimizer.step()
            rows.append((name, state_bytes_per_parameter(optimizer, params)))
        except (RuntimeError, NotImplementedError) as error:  # e.g. a CUDA-only optimizer on CPU
            rows.append((name, math.nan))
            print(f"{name}: {type(error).__name__}: {str(error)[:100]}")
    print(f"{'optimizer':>34} {'state bytes / parameter':>24}")
    for name, value in rows:
        print(f"{name:>34} {value:>24.3f}")


def train(
    state_bits: int, data: torch.Tensor, steps: int, batch: int, length: int, seed: int
) -> tuple[list[float], float]:
    model = build_model(seed)
    optimizer = StableSPAM(model.parameters(), lr=2e-3, state_bits=state_bits, reset_interval=1000)
    generator = torch.Generator().manual_seed(1000 + seed)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        offsets = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
        input_ids = torch.stack([data[o : o + length] for o in offsets.tolist()])
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, time.perf_counter() - start


def v_map_ablation(data: torch.Tensor, steps: int, batch: int, length: int) -> None:
    """4-bit states with and without a zero point in the second moment's map (one seed): the 4-bit row of the
    state-format table swapped for one whose v map is linear from 0, for the duration of one run."""
    from hf_gns_spam.kernels import step_contract

    package_row, package_code = step_contract.STATE_FORMATS[4], step_contract._code

    def code_with_zero_point(bits: int, map_name: str) -> torch.Tensor:
        if map_name == "linear_with_zero":
            return torch.arange(2**bits, dtype=torch.float32) / (2**bits - 1)
        return package_code(bits, map_name)

    first_moment = package_row.moment_formats[0]
    row_with_zero_point = dataclasses.replace(
        package_row, moment_formats=(first_moment, step_contract.QuantizedFormat(4, 128, "linear_with_zero"))
    )
    print(f"\n{'4-bit v map':>26} {'final loss':>11} {'max loss after step 50':>23}")
    for label, patched in (("without zero (package)", False), ("with a zero point", True)):
        if patched:
            step_contract.STATE_FORMATS[4], step_contract._code = row_with_zero_point, code_with_zero_point
        try:
            losses, _ = train(4, data, steps, batch, length, seed=0)
        finally:
            step_contract.STATE_FORMATS[4], step_contract._code = package_row, package_code
        print(f"{label:>26} {sum(losses[-20:]) / 20:>11.4f} {max(losses[50:]):>23.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant (model init and data order)")
    parser.add_argument("--v-map-ablation", action="store_true", help="also train 4-bit v with a zero point")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}\n")
    memory_table()
    data = stdlib_bytes(2_000_000)
    print(f"\ncorpus: {data.numel():,} bytes of the Python standard library; {args.steps} steps of "
          f"{args.batch} x {args.length} bytes\n")  # fmt: skip
    final = {}  # state_bits -> final loss per seed (mean of the last 20 steps)
    seconds = {}
    for bits in STATE_FORMATS:
        runs = [train(bits, data, args.steps, args.batch, args.length, seed) for seed in range(args.seeds)]
        final[bits] = [sum(losses[-20:]) / 20 for losses, _ in runs]
        seconds[bits] = sum(t for _, t in runs) / len(runs)
    print(f"{'state_bits':>10} {'final loss per seed':>28} {'mean':>8} {'vs 32-bit':>10} {'s/run':>7}")
    reference = sum(final[32]) / len(final[32])
    for bits, values in final.items():
        mean = sum(values) / len(values)
        per_seed = " ".join(f"{v:.4f}" for v in values)
        print(f"{bits:>10} {per_seed:>28} {mean:>8.4f} {mean / reference - 1:>+10.2%} {seconds[bits]:>7.1f}")
    spread = max(final[32]) - min(final[32])
    print(f"\nseed-to-seed spread of the 32-bit final loss: {spread:.4f} ({spread / reference:.2%} of its mean)")
    if args.v_map_ablation:
        v_map_ablation(data, args.steps, args.batch, args.length)


if __name__ == "__main__":
    main()
