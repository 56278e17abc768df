"""Subprocesses of the end-to-end tests: the DDP training script under torchrun, and what to show when a
multi-process run fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from tests.support.paths import TEST_SCRIPTS
from tests.support.ports import free_port

SCRIPT = TEST_SCRIPTS / "ddp_gns_train.py"


def torchrun(tmp_path, *arguments: str) -> list[dict]:
    """tests/scripts/ddp_gns_train.py (arguments: OUTPUT_DIR=tmp_path, then ``arguments``) in 2 processes under
    torchrun; each rank's results, from the files it wrote."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(SCRIPT), str(tmp_path), *arguments],
        capture_output=True, text=True, env=environment, check=False,
    )  # fmt: skip
    assert result.returncode == 0, failure_report(result.stderr)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def failure_report(stderr: str) -> str:
    """What a failed multi-process run said: every line that names an error or an abort (a rank's own message is
    far above torchrun's summary), then the end of stderr."""
    clues = [line for line in stderr.splitlines() if re.search(r"terminate|abort|Error|Traceback|Signal", line)]
    return "\n".join(clues[-40:]) + "\n---- end of stderr ----\n" + stderr[-3000:]
