"""Run by tests/end_to_end/test_torchrun_reruns.py under torchrun: ``fails_once.py FOLDER MODE``. Rank 0 counts its
starts in FOLDER/starts and leaves FOLDER/outputs/start-N (the N-th start's output), then, by MODE:
``teardown-abort``, its first start ends as gloo's teardown abort does (the message on stderr, then SIGABRT) and a
later one succeeds; ``error``, every start fails with an ordinary exception."""

import os
import sys
from pathlib import Path

folder, mode = Path(sys.argv[1]), sys.argv[2]
if os.environ["RANK"] == "0":
    with (folder / "starts").open("a") as starts:
        starts.write("start\n")
    start = (folder / "starts").read_text().count("start")
    (folder / "outputs").mkdir(exist_ok=True)
    (folder / "outputs" / f"start-{start}").touch()
    first = start == 1
    if mode == "teardown-abort" and first:
        print("terminate called without an active exception", file=sys.stderr, flush=True)
        os.abort()
    if mode == "error":
        raise RuntimeError("an ordinary failure of the code under test")
