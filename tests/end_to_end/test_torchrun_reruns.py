"""tests/support/processes.py's run_torchrun: a machine failure (gloo's teardown abort) is rerun once, with a
warning, in an emptied output folder; any other failure fails the test at once, with the rank's own message."""

from __future__ import annotations

import pytest

from tests.support.paths import TEST_SCRIPTS
from tests.support.processes import run_torchrun

SCRIPT = TEST_SCRIPTS / "fails_once.py"


@pytest.mark.slow
def test_a_teardown_abort_is_rerun_once_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="rerun once after gloo's teardown abort"):
        run_torchrun([str(SCRIPT), str(tmp_path), "teardown-abort"], outputs=tmp_path / "outputs")
    assert (tmp_path / "starts").read_text().count("start") == 2
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["start-2"]  # the first start's output was removed


@pytest.mark.slow
def test_any_other_failure_is_not_rerun(tmp_path):
    with pytest.raises(AssertionError, match="an ordinary failure of the code under test"):
        run_torchrun([str(SCRIPT), str(tmp_path), "error"], outputs=tmp_path / "outputs")
    assert (tmp_path / "starts").read_text().count("start") == 1
