"""Training runs of a benchmark kept on disk, one JSON file a run and seed (``FOLDER/NAME_seedS.json``), so that a
comparison can be extended with more runs or seeds, split over processes, or analysed again without retraining.

A cached run is used only when it was trained with the same configuration (the script's arguments that change
the training) and, when given, the same description of the run (``spec``); ``rerun=True`` retrains everything.
"""

from __future__ import annotations

import json
from pathlib import Path


class RunCache:
    def __init__(self, folder: Path, config: dict, rerun: bool = False):
        self.folder, self.config, self.rerun = Path(folder), config, rerun
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, seed: int) -> Path:
        return self.folder / f"{name}_seed{seed}.json"

    def get(self, name: str, seed: int, spec: str | None = None) -> dict | None:
        """The cached run, or None when there is none, it was trained otherwise, or ``rerun`` is set."""
        path = self.path(name, seed)
        if self.rerun or not path.exists():
            return None
        run = json.loads(path.read_text())
        return run if run.get("config") == self.config and run.get("spec") == spec else None

    def put(self, name: str, seed: int, run: dict, spec: str | None = None) -> None:
        """Store ``run`` (with the configuration and ``spec`` it was trained with added to it)."""
        run["config"], run["spec"] = self.config, spec
        self.path(name, seed).write_text(json.dumps(run, allow_nan=True))
