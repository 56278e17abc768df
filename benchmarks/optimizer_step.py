"""Optimizer step time of StableSPAM against torch AdamW, bitsandbytes' AdamW8bit and pytorch-optimizer's StableSPAM.

The parameters are those of LLaMA-style decoder layers (q, k, v, o, gate, up, down, two RMSNorm weights) of
hidden size d, or with ``--model 1b`` the whole parameter set of a 1.1B LLaMA (TinyLlama's shapes: 22 layers of
width 2048, grouped k/v projections of 256 rows, MLP width 5632, untied 32000-token embedding and head, final
norm: 201 tensors), so that the tensor count and shapes are realistic. Each optimizer steps on fixed random
gradients. On CPU the optimizers step in turn (machine noise hits all alike); on a GPU each is built, timed and freed
one after another (a 1.1B parameter set per optimizer does not fit nine times). The table gives each one's median
time per step (host work included: the step is timed up to a synchronisation) and the ratios against the
alternatives measured in the same run.

    python benchmarks/optimizer_step.py                                   # CPU sizes
    python benchmarks/optimizer_step.py --device cuda                     # GPU sizes
    python benchmarks/optimizer_step.py --device cuda --model 1b --dtype bfloat16

Targets: within 2x of torch's foreach AdamW on CPU; on a GPU within 1.3x of torch's fused AdamW and at least 3x
faster than pytorch-optimizer's StableSPAM, and the 8-bit step within 1.3x of bitsandbytes' AdamW8bit. Absolute
times mean something only on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch

from hf_gns_spam import StableSPAM

# isort: split
from trainer_throughput import optimizer_state_bytes  # benchmarks/ is the script's folder

#: (hidden, MLP width, layers, k/v rows, vocabulary) of the ``--model`` presets.
MODELS = {"1b": (2048, 5632, 22, 256, 32000)}


def layer_shapes(hidden: int, layers: int, inner: int | None = None, kv_rows: int | None = None) -> list[tuple]:
    """The weights of ``layers`` LLaMA decoder layers of width ``hidden`` (MLP width 8/3·hidden unless given)."""
    inner = inner or int(8 * hidden / 3) // 64 * 64 or 64
    kv_rows = kv_rows or hidden
    shapes: list[tuple] = []
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv_rows, hidden), (kv_rows, hidden), (hidden, hidden)]
        shapes += [(inner, hidden), (inner, hidden), (hidden, inner), (hidden,), (hidden,)]
    return shapes


def model_shapes(model: str) -> list[tuple]:
    """Every parameter shape of a ``--model`` preset: embedding, the decoder layers, final norm, LM head."""
    hidden, inner, layers, kv_rows, vocab = MODELS[model]
    return [(vocab, hidden), *layer_shapes(hidden, layers, inner, kv_rows), (hidden,), (vocab, hidden)]


def make_parameters(shapes: list[tuple], device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Parameters of the given shapes with random values and random gradients (generated on ``device``)."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, generator=gen, device=device).to(dtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device).to(dtype)
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(optimizer: torch.optim.Optimizer, device: str, warmup: int, repeats: int) -> float:
    """Median seconds per optimizer.step() of one optimizer (after ``warmup`` steps)."""
    for _ in range(warmup):
        optimizer.step()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_steps_interleaved(
    optimizers: dict[str, torch.optim.Optimizer], device: str, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per optimizer.step(), stepping the optimizers in turn so that machine noise hits all alike."""
    for optimizer in optimizers.values():
        for _ in range(warmup):
            optimizer.step()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def build(name: str, builder: Callable, shapes: list[tuple], device: str, dtype: torch.dtype):
    """The optimizer over fresh parameters after its first step (state allocation), or None if it cannot run."""
    try:
        optimizer = builder(make_parameters(shapes, device, dtype))
        optimizer.step()
        return optimizer
    except (RuntimeError, ValueError) as error:  # e.g. a fused kernel missing for this device/dtype
        print(f"{name}: skipped ({error.__class__.__name__}: {str(error)[:100]})")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sizes", default=None, help="comma-separated hidden:layers pairs")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="a whole model's parameter set")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    repeats = args.repeats or (50 if on_gpu else 10)
    dtype = getattr(torch, args.dtype)
    if args.model:
        shape_sets = [model_shapes(args.model)]
    else:
        sizes = args.sizes or ("1024:4,2048:4,4096:4" if on_gpu else "256:2,512:4,1024:4")
        shape_sets = [layer_shapes(*(int(x) for x in pair.split(":"))) for pair in sizes.split(",")]

    builders = optimizer_builders(args.device)
    print(f"device={args.device} dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()}")
    rows = []
    for shapes in shape_sets:
        timings: dict[str, float] = {}
        memory: dict[str, int] = {}
        if on_gpu:  # one optimizer at a time: build, time, free
            for name, builder in builders.items():
                optimizer = build(name, builder, shapes, args.device, dtype)
                if optimizer is not None:
                    timings[name] = time_steps(optimizer, args.device, warmup=3, repeats=repeats)
                    memory[name] = optimizer_state_bytes(optimizer)
                del optimizer
                gc.collect()
                torch.cuda.empty_cache()
        else:
            optimizers = {name: build(name, builder, shapes, args.device, dtype) for name, builder in builders.items()}
            optimizers = {name: optimizer for name, optimizer in optimizers.items() if optimizer is not None}
            timings = time_steps_interleaved(optimizers, args.device, warmup=3, repeats=repeats)
            memory = {name: optimizer_state_bytes(optimizer) for name, optimizer in optimizers.items()}
            del optimizers
        numel = sum(torch.Size(s).numel() for s in shapes)
        rows.append((numel, len(shapes), timings, memory))

    names = list(builders)
    header = f"{'params':>14} {'tensors':>8} " + " ".join(f"{n[:24]:>24}" for n in names)
    print("\nmilliseconds per step (median)")
    print(header)
    for numel, count, timings, _ in rows:
        cells = " ".join(f"{1e3 * timings[n]:>24.3f}" if n in timings else f"{'-':>24}" for n in names)
        print(f"{numel:>14,} {count:>8} {cells}")
    print("\noptimizer state, bytes per parameter")
    print(header)
    for numel, count, _, memory in rows:
        cells = " ".join(f"{memory[n] / numel:>24.3f}" if n in memory else f"{'-':>24}" for n in names)
        print(f"{numel:>14,} {count:>8} {cells}")

    print("\nratios (>1 means stable_spam is slower than the alternative)")
    comparisons = [
        ("stable_spam / adamw_foreach", "stable_spam", "adamw_foreach"),
        ("stable_spam / adamw_fused", "stable_spam", "adamw_fused"),
        ("bf16 states / adamw_fused", "stable_spam_bf16_states", "adamw_fused"),
        ("8bit / bnb_adamw8bit", "stable_spam_8bit", "bnb_adamw8bit"),
        ("4bit / bnb_adamw8bit", "stable_spam_4bit", "bnb_adamw8bit"),
        ("pyopt_stable_spam / stable_spam", "pyopt_stable_spam", "stable_spam"),
        ("pyopt_stable_spam_foreach / stable_spam", "pyopt_stable_spam_foreach", "stable_spam"),
    ]
    print(f"{'params':>14} " + " ".join(f"{label:>40}" for label, _, _ in comparisons))
    for numel, _, timings, _ in rows:
        cells = []
        for _, a, b in comparisons:
            cells.append(f"{timings[a] / timings[b]:>40.2f}" if a in timings and b in timings else f"{'-':>40}")
        print(f"{numel:>14,} " + " ".join(cells))


if __name__ == "__main__":
    main()
