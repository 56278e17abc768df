"""Optimizer step time of StableSPAM against torch AdamW and pytorch-optimizer's StableSPAM.

The parameters are those of LLaMA-style decoder layers (q, k, v, o, gate, up, down, two RMSNorm weights) of
hidden size d, so that the tensor count and shapes are realistic. Each optimizer steps on fixed random gradients;
the optimizers step in turn, and the table gives each one's median time per step and the ratios against the
alternatives measured in the same run.

    python benchmarks/optimizer_step.py                 # CPU sizes
    python benchmarks/optimizer_step.py --device cuda   # GPU sizes

Targets: within 2x of torch's foreach AdamW on CPU; on a GPU within 1.3x of torch's fused AdamW and at least 3x
faster than pytorch-optimizer's StableSPAM, and the 8-bit step within 1.3x of bitsandbytes' AdamW8bit. Absolute
times mean something only on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hf_gns_spam import StableSPAM


def decoder_parameters(hidden: int, layers: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """The weights of ``layers`` LLaMA decoder layers of width ``hidden`` (MLP width 8/3·hidden)."""
    inner = int(8 * hidden / 3) // 64 * 64 or 64
    shapes = []
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inner, hidden), (inner, hidden), (hidden, inner)] + [(hidden,)] * 2
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
    return params


def optimizer_builders(device: str) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    builders: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
        "stable_spam": lambda ps: StableSPAM(ps, lr=1e-4, reset_interval=1000),
        "stable_spam_bf16_states": lambda ps: StableSPAM(ps, lr=1e-4, state_bits=16),
        "stable_spam_8bit": lambda ps: StableSPAM(ps, lr=1e-4, state_bits=8),
        "stable_spam_4bit": lambda ps: StableSPAM(ps, lr=1e-4, state_bits=4),
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    }
    try:
        import bitsandbytes

        builders["bnb_adamw8bit"] = lambda ps: bitsandbytes.optim.AdamW8bit(ps, lr=1e-4)
    except ImportError:
        print("bitsandbytes not installed: its AdamW8bit is left out")
    try:
        import pytorch_optimizer

        builders["pyopt_stable_spam"] = lambda ps: pytorch_optimizer.StableSPAM(ps, lr=1e-4)
        builders["pyopt_stable_spam_foreach"] = lambda ps: pytorch_optimizer.StableSPAM(ps, lr=1e-4, foreach=True)
    except ImportError:
        print("pytorch-optimizer not installed: its StableSPAM is left out")
    return builders


def time_steps_interleaved(
    optimizers: dict[str, torch.optim.Optimizer], device: str, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per optimizer.step(), stepping the optimizers in turn so that machine noise hits all alike."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for optimizer in optimizers.values():
        for _ in range(warmup):
            optimizer.step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sizes", default=None, help="comma-separated hidden:layers pairs")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    sizes = args.sizes or ("1024:4,2048:4,4096:4" if on_gpu else "256:2,512:4,1024:4")
    repeats = args.repeats or (50 if on_gpu else 10)
    dtype = getattr(torch, args.dtype)

    builders = optimizer_builders(args.device)
    print(f"device={args.device} dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()}")
    rows = []
    for pair in sizes.split(","):
        hidden, layers = (int(x) for x in pair.split(":"))
        optimizers = {}
        for name, build in builders.items():
            params = decoder_parameters(hidden, layers, args.device, dtype)
            try:
                optimizers[name] = build(params)
                optimizers[name].step()
            except (RuntimeError, ValueError) as error:  # e.g. a fused kernel missing for this device/dtype
                print(f"{name}: skipped at d={hidden} ({error.__class__.__name__}: {str(error)[:80]})")
                optimizers.pop(name, None)
        timings = time_steps_interleaved(optimizers, args.device, warmup=3, repeats=repeats)
        rows.append((sum(p.numel() for p in params), len(params), timings))
        del optimizers

    names = list(builders)
    header = f"{'params':>12} {'tensors':>8} " + " ".join(f"{n[:24]:>24}" for n in names)
    print("\nmilliseconds per step (median)")
    print(header)
    for numel, count, timings in rows:
        cells = " ".join(f"{1e3 * timings[n]:>24.3f}" if n in timings else f"{'-':>24}" for n in names)
        print(f"{numel:>12,} {count:>8} {cells}")

    print("\nratios (>1 means stable_spam is slower than the alternative)")
    comparisons = [
        ("stable_spam / adamw_foreach", "stable_spam", "adamw_foreach"),
        ("stable_spam / adamw_fused", "stable_spam", "adamw_fused"),
        ("bf16 states / adamw_foreach", "stable_spam_bf16_states", "adamw_foreach"),
        ("8bit / bnb_adamw8bit", "stable_spam_8bit", "bnb_adamw8bit"),
        ("4bit / bnb_adamw8bit", "stable_spam_4bit", "bnb_adamw8bit"),
        ("pyopt_stable_spam / stable_spam", "pyopt_stable_spam", "stable_spam"),
        ("pyopt_stable_spam_foreach / stable_spam", "pyopt_stable_spam_foreach", "stable_spam"),
    ]
    print(f"{'params':>12} " + " ".join(f"{label:>40}" for label, _, _ in comparisons))
    for numel, _, timings in rows:
        cells = []
        for _, a, b in comparisons:
            cells.append(f"{timings[a] / timings[b]:>40.2f}" if a in timings and b in timings else f"{'-':>40}")
        print(f"{numel:>12,} " + " ".join(cells))


if __name__ == "__main__":
    main()
