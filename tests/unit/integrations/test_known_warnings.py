"""The three third-party messages of an offline CPU run are silenced at their source, and nothing else is."""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

from hf_gns_spam.integrations.known_warnings import (
    BITSANDBYTES_CPU_LOGGER,
    BITSANDBYTES_KERNELS_MESSAGE,
    KERNELS_HUB_LOGGER,
    KERNELS_OFFLINE_TRUST_MESSAGE,
    PIN_MEMORY_MESSAGE,
    silence_known_warnings,
)


def bitsandbytes_kernels_format() -> str:
    """The format string bitsandbytes logs the message with, read from its source (so that a reworded message in a
    new bitsandbytes release fails here instead of slipping through the filter)."""
    import bitsandbytes.backends.cpu.ops as cpu_ops

    source = inspect.getsource(cpu_ops)
    start = source.index(BITSANDBYTES_KERNELS_MESSAGE)
    return source[start : source.index('"', start)]


def test_the_bitsandbytes_kernels_message_is_dropped_and_the_loggers_other_records_pass(caplog):
    silence_known_warnings()
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    with caplog.at_level(logging.DEBUG):
        logger.warning(bitsandbytes_kernels_format(), ImportError("No module named 'kernels'"))
        logger.warning("Failed to load something else: %s", "reason")
        logger.error("%s", BITSANDBYTES_KERNELS_MESSAGE[:20])
    messages = [record.getMessage() for record in caplog.records if record.name == BITSANDBYTES_CPU_LOGGER]
    assert messages == ["Failed to load something else: reason", BITSANDBYTES_KERNELS_MESSAGE[:20]]


def kernels_offline_trust_message(repo_id: str) -> str:
    """The message ``kernels`` logs for ``repo_id`` when the Hub is offline, from its source's f-string (a reworded
    message in a new release fails here)."""
    import kernels._internals.hf_hub as hf_hub

    source = inspect.getsource(hf_hub)
    start = source.index('f"Skipping publisher trust check')
    template = source[start + 2 : source.index('"', start + 2)]
    assert "{repo_id}" in template, template
    return template.replace("{repo_id}", repo_id)


def test_the_kernels_offline_trust_message_is_dropped_for_bitsandbytes_kernel_only(caplog):
    silence_known_warnings()
    logger = logging.getLogger(KERNELS_HUB_LOGGER)
    assert logging.getLogger(kernels_logger_name()) is logger  # the filter sits on the logger kernels logs through
    with caplog.at_level(logging.DEBUG):
        logger.warning(kernels_offline_trust_message("kernels-community/quantization-bitsandbytes"))
        logger.warning(kernels_offline_trust_message("kernels-community/activation"))  # a kernel the user loads
        logger.warning("Something else")
    messages = [record.getMessage() for record in caplog.records if record.name == KERNELS_HUB_LOGGER]
    assert messages == [kernels_offline_trust_message("kernels-community/activation"), "Something else"]
    assert kernels_offline_trust_message("kernels-community/quantization-bitsandbytes").startswith(
        KERNELS_OFFLINE_TRUST_MESSAGE
    )


def kernels_logger_name() -> str:
    import kernels._internals.hf_hub as hf_hub

    return hf_hub.logger.name


def run_python(code: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)


@pytest.mark.slow
def test_importing_hf_gns_spam_before_transformers_trainer_keeps_bitsandbytes_and_kernels_quiet():
    quiet = run_python("import hf_gns_spam; import transformers.trainer, bitsandbytes")
    assert BITSANDBYTES_KERNELS_MESSAGE not in quiet.stderr
    assert KERNELS_OFFLINE_TRUST_MESSAGE not in quiet.stderr
    # without the package the messages are printed where bitsandbytes takes its AVX512-BF16 CPU branch
    import bitsandbytes.functional

    if not bitsandbytes.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not log the messages here")
    loud = run_python("import bitsandbytes").stderr
    assert BITSANDBYTES_KERNELS_MESSAGE in loud
    assert KERNELS_OFFLINE_TRUST_MESSAGE in loud


def iterate(loader: torch.utils.data.DataLoader) -> None:
    for _ in loader:
        pass


def test_the_pin_memory_warning_without_accelerator_is_dropped_and_the_modules_other_warnings_show():
    data = torch.arange(4.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        iterate(torch.utils.data.DataLoader(data, pin_memory=True))
        # another warning of the same module, in the same code path
        iterate(torch.utils.data.DataLoader(data, pin_memory=True, pin_memory_device="cpu"))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if PIN_MEMORY_MESSAGE in m]
    assert any("pin_memory_device is deprecated" in m for m in messages)


def test_without_the_filter_torch_warns_about_pin_memory():
    if torch.accelerator.is_available():
        pytest.skip("with an accelerator torch pins memory and does not warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        iterate(torch.utils.data.DataLoader(torch.arange(4.0), pin_memory=True))
    assert any(PIN_MEMORY_MESSAGE in str(w.message) for w in caught)


def test_installing_twice_adds_nothing():
    silence_known_warnings()
    loggers = [logging.getLogger(name) for name in (BITSANDBYTES_CPU_LOGGER, KERNELS_HUB_LOGGER)]
    filters, logger_filters = list(warnings.filters), [list(logger.filters) for logger in loggers]
    silence_known_warnings()
    assert warnings.filters == filters
    assert [logger.filters for logger in loggers] == logger_filters
