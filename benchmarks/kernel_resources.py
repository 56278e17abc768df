"""Compile every Triton kernel configuration for a GPU that is not there, and report its resources.

The kernels run on CPU tensors only under the Triton interpreter, which accepts programs that the compiler rejects and
says nothing about registers or spills. This script compiles them for real, for an NVIDIA target (sm_90 by default,
the H100/H200), on a machine without a GPU: a stand-in Triton driver names the target, and each launch in the
package's own launchers (``gns_norm_forward``/``gns_norm_backward``, ``triton_update_tensor``) is turned into a
compile (``JITFunction.warmup``) with the arguments and constexprs the launcher chose for a CPU tensor of the
configured shape. ptxas (shipped in Triton's wheel) produces the cubin; ``cuobjdump --dump-resource-usage`` reads
its registers, stack frame, local memory (spills) and shared memory, and the PTX gives the widest global load per
thread ("load B": 16 when the element loads are vectorized to 128 bits).

    python benchmarks/kernel_resources.py            # the configurations a GPU session runs (about a minute)
    python benchmarks/kernel_resources.py --quick    # one configuration of each kernel variant
    python benchmarks/kernel_resources.py --check    # exit 1 if a configuration does not compile
    python benchmarks/kernel_resources.py --arch 100 # another target (compute capability × 10)
    python benchmarks/kernel_resources.py --step-host-time 201   # host time of StableSPAM.step() over 201 tensors

Nothing is launched and the outputs the launchers return are meaningless: only the compiled kernels are kept. The
launchers plan backward tiles for an H100/H200's 132 SMs (``--sms``). Run it with ``TRITON_INTERPRET`` unset.

``--step-host-time N`` times the host side of ``StableSPAM.step()`` on the fused Triton path over N bf16 tensors
(TinyLlama has 201) with every launch compiled once and then dispatched up to the point where a GPU would be
called (``JITFunction.run(warmup=True)``): the optimizer's bookkeeping, the checks, the tensor tables and Triton's
own dispatch, without the final driver call (a few µs per launch). A GPU step takes at least the larger of this
and the kernels' time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as triton_driver

from hf_gns_spam import StableSPAM
from hf_gns_spam.kernels import gns_norm, stable_spam_step
from hf_gns_spam.kernels.norm_contract import NormSpec
from hf_gns_spam.kernels.norm_variants import VARIANTS, NormVariant
from hf_gns_spam.kernels.step_contract import STATE_FORMATS, StepHyperparameters

_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _TargetOnlyDriver:
    """The parts of a Triton driver that compiling needs: a device, a stream and the target to compile for."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@dataclass
class Compiled:
    """One compiled kernel: which configuration asked for it, and the cubin's resource usage."""

    config: str
    kernel: str
    num_warps: int
    resources: dict[str, int]
    widest_load: int  # bytes of the widest global load per thread in the PTX (16: vectorized 128-bit loads)


class _CompileOnLaunch:
    """Stands in for a ``@triton.jit`` kernel in a launcher's module: ``kernel[grid](...)`` compiles instead."""

    def __init__(self, kernel: Any, sink: list[tuple[str, Any, int]]) -> None:
        self.kernel = kernel
        self.sink = sink

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def compile_only(*args: Any, **kwargs: Any) -> None:
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            self.sink.append((self.kernel.__name__, compiled, kwargs.get("num_warps", 4)))

        return compile_only


def widest_global_load(ptx: str) -> int:
    """Bytes of the widest ``ld.global`` in ``ptx`` (``ld.global.v4.b32``: 16)."""
    widths = [
        int(vector or 1) * int(bits) // 8
        for vector, bits in re.findall(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfus](\d+)", ptx)
    ]
    return max(widths, default=0)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL, … of the one function in ``cubin`` (``cuobjdump --dump-resource-usage``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run(
            [_CUOBJDUMP, "--dump-resource-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(line for line in report.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in (field.split(":") for field in line.split() if ":" in field)}


# --------------------------------------------------------------------------------------------------------------------
# configurations: each drives a launcher once on CPU tensors
# --------------------------------------------------------------------------------------------------------------------

#: What each variant of the norm table (kernels/norm_variants.py) is compiled for: one (dtype, width) per regime
#: in ``--quick``, every dtype and width for the plain and segmented regimes otherwise.
NORM_REGIMES = ("plain", "segmented", "frozen")
#: The kernels one norm configuration launches: a forward and a backward.
NORM_KERNELS = ("_gns_norm_fwd_kernel", "_gns_norm_bwd_kernel")


def _norm_case(variant: NormVariant, dtype: str, d: int, tokens: int, regime: str) -> Callable[[], None]:
    """Forward and backward of one norm configuration: ``tokens`` rows of ``d`` features in 4 examples."""
    segmented, frozen = regime == "segmented", regime == "frozen"

    def run() -> None:
        spec = NormSpec.of(variant, 1e-6)
        x = torch.randn(4, tokens // 4, d, dtype=_DTYPES[dtype])
        weight = torch.randn(d, dtype=_DTYPES[dtype])
        bias = torch.randn(d, dtype=_DTYPES[dtype]) if spec.variant.bias else None
        _, mean, rstd = gns_norm.gns_norm_forward(spec, x, weight, bias)
        segment_ids = None
        if segmented:  # three sequences per row, as a packed batch
            per_row = torch.arange(tokens // 4) * 3 // (tokens // 4)
            segment_ids = (torch.arange(4)[:, None] * 3 + per_row).to(torch.int64)
        gns_norm.gns_norm_backward(
            spec, torch.randn_like(x), x, weight, bias, mean, rstd, True, not frozen, bias is not None and not frozen,
            segment_ids=segment_ids,
        )  # fmt: skip

    return run


def _step_case(param_dtype: str, state_bits: int, mode: str, weight_decay: float, reset: bool) -> Callable[[], None]:
    """One fused Stable-SPAM step on a 1M-element tensor with the optimizer's own state for ``state_bits``."""

    def run() -> None:
        param = torch.randn(1024, 1024, dtype=_DTYPES[param_dtype])
        optimizer = StableSPAM([param], lr=1e-3, state_bits=state_bits, mode=mode, weight_decay=weight_decay)
        state = optimizer._init_state(param, optimizer.param_groups[0])
        hp = StepHyperparameters(
            lr=1e-3, weight_decay=weight_decay, beta1=0.9, beta2=0.999, gamma1=0.7, gamma2=0.9, gamma3=0.999,
            eps=1e-8, faithful=mode == "faithful", is_reset_step=reset,
        )  # fmt: skip
        stable_spam_step.triton_update_tensor(param, state, hp, 3, 3, grad=torch.randn_like(param))

    return run


def configurations(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, run) for every configuration: the shapes and dtypes the GPU tests and benchmarks launch."""
    widths = (4096,) if quick else (128, 1024, 2048, 4096, 8192, 16384)
    dtypes = ("bf16",) if quick else ("bf16", "fp32", "fp16")
    for variant in VARIANTS:
        for regime in NORM_REGIMES:
            shapes = [("bf16", 4096)] if regime == "frozen" else [(dtype, d) for dtype in dtypes for d in widths]
            for dtype, d in shapes:
                name = f"norm {variant.formula} {variant.rounding.name} {dtype} D={d} {regime}"
                yield name, _norm_case(variant, dtype, d, 64, regime)
    for param_dtype in ("fp32", "bf16") if quick else ("fp32", "bf16", "fp16"):
        for state_bits in STATE_FORMATS:
            for mode in ("clean", "faithful"):
                name = f"step {param_dtype} moments={state_bits}bit {mode}"
                yield name, _step_case(param_dtype, state_bits, mode, weight_decay=0.1, reset=mode == "faithful")
    yield "step bf16 moments=32bit clean no decay", _step_case("bf16", 32, "clean", weight_decay=0.0, reset=False)


# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stand_ins(arch: int, replacements: dict[tuple[Any, str], Any]) -> Iterator[list[tuple[str, Any, int]]]:
    """Inside the block the stand-in driver targets sm_``arch``, every kernel of the launchers' modules compiles
    instead of launching (the compiled kernels go to the yielded list) and ``replacements`` ({(module, name):
    value}) are in place; everything is put back after it."""
    triton_driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    sink: list[tuple[str, Any, int]] = []
    kernels = [(gns_norm, name) for name in NORM_KERNELS]
    kernels += [(stable_spam_step, name) for name in _STEP_KERNELS]
    patches = {key: _CompileOnLaunch(getattr(*key), sink) for key in kernels} | replacements
    originals = {key: getattr(*key) for key in patches}
    try:
        for (module, name), value in patches.items():
            setattr(module, name, value)
        yield sink
    finally:
        for (module, name), value in originals.items():
            setattr(module, name, value)


def compile_all(quick: bool, arch: int, sms: int) -> tuple[list[Compiled], list[tuple[str, str]]]:
    """Compile every configuration's kernels; returns the compiled kernels and the (configuration, error) failures."""
    replacements = {
        (gns_norm, "_sm_count"): functools.cache(lambda device: sms),
        # CPU tensors are refused outside the interpreter; the checks are the host's business, not the compiler's.
        (stable_spam_step, "_unsupported_reason"): lambda param, state, grad: None,
    }
    compiled: list[Compiled] = []
    failures: list[tuple[str, str]] = []
    with _stand_ins(arch, replacements) as sink:
        for config, run in configurations(quick):
            sink.clear()
            try:
                run()
            except Exception:  # report every configuration's failure, then fail at the end
                failures.append((config, traceback.format_exc(limit=-3)))
                continue
            for kernel_name, kernel, num_warps in sink:
                resources = resource_usage(kernel.asm["cubin"])
                widest = widest_global_load(kernel.asm["ptx"])
                compiled.append(Compiled(config, kernel_name, num_warps, resources, widest))
    return compiled, failures


def step_host_time(tensors: int, state_bits: int, arch: int, repeats: int = 20) -> tuple[float, float]:
    """(median host seconds of one ``StableSPAM.step()`` over ``tensors`` bf16 tensors of 4096 elements on the fused
    path, launches per step). Each launch is compiled once, then only dispatched (a compile-cache hit)."""
    import statistics
    import time

    import hf_gns_spam.optim.stable_spam as stable_spam_module

    replacements = {
        # CPU tensors pass the fused path's device check only "under the interpreter"; the other checks run
        (stable_spam_step, "interpreting"): lambda: True,
        (stable_spam_module, "_use_triton"): lambda param: True,
    }
    with _stand_ins(arch, replacements) as launches:
        params = [torch.zeros(4096, dtype=torch.bfloat16, requires_grad=True) for _ in range(tensors)]
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer = StableSPAM(params, lr=1e-4, state_bits=state_bits)
        for _ in range(3):
            optimizer.step()
        launches.clear()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples), len(launches) / repeats


_STEP_KERNELS = ("_max_abs_kernel", "_clipped_sumsq_kernel", "_update_kernel")


#: Exit status when this Triton's internals do not fit the stand-in driver (the tests skip on it).
STAND_IN_UNSUPPORTED = 3


@triton.jit
def _copy_kernel(X, Y, BLOCK: triton.language.constexpr):
    offsets = triton.language.arange(0, BLOCK)
    triton.language.store(Y + offsets, triton.language.load(X + offsets))


def _check_stand_in_driver(arch: int) -> None:
    """Compile a trivial kernel through the stand-in driver (raises where this Triton's internals differ)."""
    triton_driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    compiled = _copy_kernel.warmup(torch.empty(16), torch.empty(16), BLOCK=16, grid=(1,))
    resource_usage(compiled.asm["cubin"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one configuration of each kernel variant")
    parser.add_argument("--check", action="store_true", help="exit 1 if a configuration does not compile")
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 to compile for (90: H100/H200)")
    parser.add_argument("--sms", type=int, default=132, help="SMs the backward's tile plan assumes")
    parser.add_argument("--step-host-time", type=int, metavar="TENSORS", help="time the optimizer step's host side")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernel_resources.py compiles kernels: run it with TRITON_INTERPRET unset")
    if not os.path.exists(_CUOBJDUMP):
        sys.exit(f"Triton {triton.__version__} has no NVIDIA backend tools here ({_CUOBJDUMP})")
    try:
        _check_stand_in_driver(args.arch)
    except Exception as error:
        print(f"Triton {triton.__version__} does not compile through the stand-in driver: {error!r}", file=sys.stderr)
        sys.exit(STAND_IN_UNSUPPORTED)
    if args.step_host_time:
        print(f"triton {triton.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        for state_bits in (32, 8):
            seconds, launches = step_host_time(args.step_host_time, state_bits, args.arch)
            print(
                f"StableSPAM.step() host time, {args.step_host_time} tensors, {state_bits}-bit moments: "
                f"{seconds * 1e3:.2f} ms ({seconds / args.step_host_time * 1e6:.1f} µs a tensor), "
                f"{launches:.0f} launches"
            )
        return

    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}, {args.sms} SMs")
    compiled, failures = compile_all(args.quick, args.arch, args.sms)
    header = (
        f"{'configuration':<60} {'kernel':<26} {'warps':>5} {'regs':>5} {'stack':>6} {'local':>6} {'shared':>7} "
        f"{'load B':>6}"
    )
    print(header)
    print("-" * len(header))
    for item in compiled:
        r = item.resources
        print(
            f"{item.config:<60} {item.kernel.lstrip('_'):<26} {item.num_warps:>5} {r['REG']:>5} {r['STACK']:>6} "
            f"{r['LOCAL']:>6} {r['SHARED']:>7} {item.widest_load:>6}"
        )
    spilled = [item for item in compiled if item.resources["LOCAL"] or item.resources["STACK"]]
    for config, error in failures:
        print(f"\nFAILED {config}:\n{error}")
    print(f"\n{len(compiled)} kernels compiled, {len(failures)} configurations failed, {len(spilled)} use local memory")
    if args.check and failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
