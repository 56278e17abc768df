"""Silence exactly two messages other libraries print on every CPU training run, at their source, and nothing else.

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
    "PIN_MEMORY_MESSAGE",
    "silence_known_warnings",
]

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
# the start of the record's format string (its argument is the ImportError or the download error)
BITSANDBYTES_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
PIN_MEMORY_MESSAGE = "'pin_memory' argument is set as true but no accelerator is found"
_PIN_MEMORY_MODULE = r"torch\.utils\.data\.dataloader"


class _DropBitsandbytesKernelsMessage(logging.Filter):
    """Drops the one record of :data:`BITSANDBYTES_CPU_LOGGER` about the missing ``kernels`` package."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(BITSANDBYTES_KERNELS_MESSAGE))


def silence_known_warnings() -> None:
    """Install both filters (idempotent: a second call adds nothing)."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, _DropBitsandbytesKernelsMessage) for f in logger.filters):
        logger.addFilter(_DropBitsandbytesKernelsMessage())
    # filterwarnings drops an identical earlier entry before inserting, so repeated calls keep one
    warnings.filterwarnings("ignore", message=PIN_MEMORY_MESSAGE, category=UserWarning, module=_PIN_MEMORY_MODULE)
