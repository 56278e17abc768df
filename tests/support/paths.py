"""Where the tests find the repository's files, independent of how deep a test module sits under tests/."""

from __future__ import annotations

from pathlib import Path

#: the repository's root (pyproject.toml, README.md, constraints.txt, examples/, benchmarks/, scripts/)
REPO_ROOT = Path(__file__).resolve().parents[2]
#: the package's source folder
PACKAGE = REPO_ROOT / "hf_gns_spam"
#: the scripts the end-to-end tests run under torchrun or the launcher (tests/scripts/)
TEST_SCRIPTS = REPO_ROOT / "tests" / "scripts"
