"""Forward+backward time and achieved memory bandwidth of the GNS-aware normalization against the alternatives.

For each hidden size D in {1024, 2048, 4096, 8192} and 16k tokens (bf16 by default) it times, for RMSNorm (Llama
rounding) and LayerNorm, one forward and one backward of:

    eager          the transformers module (LlamaRMSNorm) / nn.LayerNorm in PyTorch eager
    compile        the same module under torch.compile
    liger          Liger-Kernel's LigerRMSNorm / LigerLayerNorm (if installed; GPU only)
    gns            hf_gns_spam's kernel with per-example statistics (the patched module)
    gns_no_stats   the same kernel with the weight frozen, so no statistics are computed

and prints the median time, the bandwidth (bytes of x, y, dy, dx read or written once, over the time) as a
fraction of the measured device copy bandwidth, and the ratios gns/liger and gns/gns_no_stats.

    python benchmarks/norm_kernels.py                 # GPU if there is one, else CPU (torch path, small sizes)

Targets (issue 3, GPU): no slower than Liger-Kernel's kernel, statistics cost under 3%, 80% of copy bandwidth.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_gns_spam import patch_model


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(run: Callable[[], None], device: str, repeats: int) -> float:
    for _ in range(3):
        run()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def copy_bandwidth(device: str, numel: int, dtype: torch.dtype, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (one read and one write per element)."""
    src = torch.empty(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * numel * src.element_size() / seconds


def make_modules(kind: str, hidden: int, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    if kind == "rms_norm":
        base = LlamaRMSNorm(hidden, eps=1e-6)
    else:
        base = nn.LayerNorm(hidden, eps=1e-5)
    base = base.to(device=device, dtype=dtype)
    modules: dict[str, nn.Module] = {"eager": base, "compile": torch.compile(copy.deepcopy(base))}
    if device.startswith("cuda"):
        try:
            from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm

            liger = LigerRMSNorm(hidden, eps=1e-6) if kind == "rms_norm" else LigerLayerNorm(hidden, eps=1e-5)
            modules["liger"] = liger.to(device=device, dtype=dtype)
        except ImportError:
            print("liger-kernel not installed: its kernels are left out (pip install liger-kernel)")
    for name in ("gns", "gns_no_stats"):
        wrapper = nn.Sequential(copy.deepcopy(base))  # patch_model patches children, keep the root a container
        patch_model(wrapper)
        modules[name] = wrapper[0]
    modules["gns_no_stats"].weight.requires_grad_(False)
    return modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, default=None, help="rows; default 16384 on GPU, 2048 on CPU")
    parser.add_argument("--hidden", default=None, help="comma-separated D; default 1024,2048,4096,8192 (CPU: 1024)")
    parser.add_argument("--batch", type=int, default=8, help="examples the tokens are split into")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    tokens = args.tokens or (16384 if on_gpu else 2048)
    hidden_sizes = [int(d) for d in (args.hidden or ("1024,2048,4096,8192" if on_gpu else "1024")).split(",")]
    repeats = args.repeats or (50 if on_gpu else 5)
    dtype = getattr(torch, args.dtype)
    element = torch.empty((), dtype=dtype).element_size()
    bandwidth = copy_bandwidth(args.device, tokens * max(hidden_sizes), dtype, repeats)
    print(f"device={args.device} dtype={args.dtype} tokens={tokens} examples={args.batch} torch={torch.__version__}")
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s\n")
    print(f"{'kind':>9} {'D':>6} {'variant':>13} {'ms fwd+bwd':>11} {'GB/s':>8} {'of copy':>8}")
    for kind in ("rms_norm", "layer_norm"):
        for hidden in hidden_sizes:
            x = torch.randn(args.batch, tokens // args.batch, hidden, device=args.device, dtype=dtype)
            x.requires_grad_(True)
            dy = torch.randn_like(x)
            moved_bytes = 4 * x.numel() * element  # x and dy read, y and dx written
            times = {}
            for name, module in make_modules(kind, hidden, args.device, dtype).items():

                def step(module: nn.Module = module, x: torch.Tensor = x, dy: torch.Tensor = dy) -> None:
                    x.grad = None
                    module(x).backward(dy)

                seconds = median_seconds(step, args.device, repeats)
                times[name] = seconds
                rate = moved_bytes / seconds
                row = f"{kind:>9} {hidden:>6} {name:>13} {1e3 * seconds:>11.3f}"
                print(f"{row} {rate / 1e9:>8.1f} {rate / bandwidth:>8.0%}")
            ratios = [f"gns/gns_no_stats {times['gns'] / times['gns_no_stats']:.3f}"]
            ratios.append(f"gns/eager {times['gns'] / times['eager']:.2f}")
            ratios.append(f"gns/compile {times['gns'] / times['compile']:.2f}")
            if "liger" in times:
                ratios.append(f"gns/liger {times['gns'] / times['liger']:.2f}")
            print(f"{'':>9} {'':>6} {'ratios:':>13} " + ", ".join(ratios))


if __name__ == "__main__":
    main()
