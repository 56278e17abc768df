"""Every Triton kernel configuration compiles for an H100/H200 (sm_90), on this machine without a GPU.

The other tests run the kernels under the Triton interpreter, which accepts programs the compiler rejects; this one
compiles them for real (``benchmarks/kernel_resources.py``: ptxas from Triton's wheel, nothing launched), in a
subprocess because the interpreter is chosen when triton is imported. The tool drives Triton's internals (a stand-in
driver, ``JITFunction.warmup``/``run``); on a Triton where a trivial kernel does not compile that way the tests skip.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from hf_gns_spam.kernels.norm_variants import VARIANTS
from tests.support.paths import REPO_ROOT

triton = pytest.importorskip("triton")

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
#: kernel_resources.py's exit status when this Triton's internals do not fit its stand-in driver: a tool problem,
#: not the package's, so the tests skip with its message.
STAND_IN_UNSUPPORTED = 3


def kernel_resources_module() -> ModuleType:
    """``benchmarks/kernel_resources.py`` imported (it compiles nothing on import), to read what it enumerates."""
    spec = importlib.util.spec_from_file_location("kernel_resources", REPO_ROOT / "benchmarks" / "kernel_resources.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def expected_quick_kernels() -> int:
    """How many kernels ``--quick`` compiles, from the tables the launchers read: every row of the norm variant
    table in each norm regime, a forward and a backward; every optimizer-step configuration the tool enumerates,
    each of the step's kernels."""
    tool = kernel_resources_module()
    norm = len(VARIANTS) * len(tool.NORM_REGIMES) * len(tool.NORM_KERNELS)
    steps = sum(name.startswith("step ") for name, _ in tool.configurations(quick=True))
    return norm + steps * len(tool._STEP_KERNELS)


def run_kernel_resources(*arguments: str) -> str:
    """stdout of ``benchmarks/kernel_resources.py ARGUMENTS`` compiling for real (TRITON_INTERPRET unset); skips the
    test when this Triton does not fit the tool's stand-in driver, fails on any other non-zero exit."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "kernel_resources.py"), *arguments],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    if result.returncode == STAND_IN_UNSUPPORTED:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton build has no NVIDIA backend tools")
def test_every_kernel_variant_compiles_for_sm90():
    stdout = run_kernel_resources("--quick", "--check")
    compiled = int(stdout.strip().splitlines()[-1].split()[0])
    assert compiled == expected_quick_kernels(), stdout[-4000:]


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton build has no NVIDIA backend tools")
def test_optimizer_step_launches_three_kernels_whatever_the_tensor_count():
    """The fused Stable-SPAM step dispatches one launch per kernel for all the tensors of a format (the host's cost
    does not grow by three launches a tensor): 3 launches a step for 5 tensors and for 60, at 32 and 8 bits."""
    for tensors in (5, 60):
        stdout = run_kernel_resources("--step-host-time", str(tensors))
        lines = [line for line in stdout.splitlines() if line.startswith("StableSPAM.step() host time")]
        assert len(lines) == 2 and all(line.endswith(", 3 launches") for line in lines), stdout
