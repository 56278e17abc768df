"""Silence exactly three messages other libraries print on every offline CPU training run, at their source, and nothing
else. Each is checked against the pinned versions of ``constraints.txt``
(tests/unit/integrations/test_known_warnings.py).

* bitsandbytes (0.49+, observed in 0.50.2) logs, once, when it is imported on a CPU with AVX512-BF16 (and
  transformers' ``Trainer`` imports peft, which imports bitsandbytes)::

      Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure ...

  through the logger ``bitsandbytes.backends.cpu.ops``, whenever the optional Hugging Face ``kernels`` package is
  missing or cannot fetch that kernel (offline). The kernel would only serve bitsandbytes' bfloat16 CPU inference
  path for repacked 4-bit weights, which :func:`~hf_gns_spam.patch_model` turns off (a repacked layer has no
  backward, :mod:`hf_gns_spam.integrations.bitsandbytes_cpu`); bitsandbytes falls back to its own library anyway.
  A :class:`logging.Filter` on that logger drops records whose format string starts with that sentence; every
  other record of the logger passes. Loggers are created by name, so the filter is in place before bitsandbytes
  is imported, which is what it needs: the message is logged during the import. ``import hf_gns_spam`` (or
  ``hf-gns-spam launch``) before transformers' ``Trainer`` is imported.
* Hugging Face ``kernels`` (0.19+, a dependency of transformers 5.25+) logs, in that same bitsandbytes import, when
  the Hub is offline (``HF_HUB_OFFLINE=1``)::

      Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is
      in offline mode.

  through the logger ``kernels._internals.hf_hub``, before its attempt to load the same kernel from the local cache
  fails (the bitsandbytes message above). A filter on that logger drops this record for that one repository only:
  the same message for any kernel a user loads on purpose still shows.
* torch's ``DataLoader`` warns ``'pin_memory' argument is set as true but no accelerator is found, then device
  pinned memory won't be used.`` every time a loader is iterated on a machine without an accelerator, and the
  Trainer's ``dataloader_pin_memory`` is True by default. Pinned memory only speeds up copies to an accelerator;
  without one the loader already ignores the flag. A warnings filter matches that message, as a ``UserWarning``
  attributed to ``torch.utils.data.dataloader``, only; other warnings of that module still show.
"""

from __future__ import annotations

import logging
import warnings

__all__ = [
    "BITSANDBYTES_CPU_LOGGER",
    "BITSANDBYTES_KERNELS_MESSAGE",
    "KERNELS_HUB_LOGGER",
    "KERNELS_OFFLINE_TRUST_MESSAGE",
    "PIN_MEMORY_MESSAGE",
    "silence_known_warnings",
]

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
# the start of the record's format string (its argument is the ImportError or the download error)
BITSANDBYTES_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
# the whole start of the (already formatted) record, repository included
KERNELS_OFFLINE_TRUST_MESSAGE = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"
PIN_MEMORY_MESSAGE = "'pin_memory' argument is set as true but no accelerator is found"
_PIN_MEMORY_MODULE = r"torch\.utils\.data\.dataloader"


class _DropMessageStart(logging.Filter):
    """Drops the records of one logger whose message string starts with ``start``; every other record passes."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.start))


_LOGGER_MESSAGES = {
    BITSANDBYTES_CPU_LOGGER: BITSANDBYTES_KERNELS_MESSAGE,
    KERNELS_HUB_LOGGER: KERNELS_OFFLINE_TRUST_MESSAGE,
}


def silence_known_warnings() -> None:
    """Install the three filters (idempotent: a second call adds nothing)."""
    for logger_name, start in _LOGGER_MESSAGES.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessageStart) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessageStart(start))
    # filterwarnings drops an identical earlier entry before inserting, so repeated calls keep one
    warnings.filterwarnings("ignore", message=PIN_MEMORY_MESSAGE, category=UserWarning, module=_PIN_MEMORY_MODULE)
