"""A test harness that makes every host synchronisation of a tensor an error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

SYNCING_METHODS = ("item", "__bool__", "tolist", "__float__", "__int__", "__index__", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def forbid_host_sync(monkeypatch: pytest.MonkeyPatch, where: str) -> Iterator[None]:
    """Inside the block, reading a tensor's value on the host (``.item()``, ``bool()``, ``.tolist()``, boolean-mask
    indexing, ...) raises ``AssertionError`` naming ``where``."""

    def forbidden(name: str):
        def fail(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name} called inside {where}")

        return fail

    original_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        if torch.is_tensor(index) and index.dtype == torch.bool:
            raise AssertionError(f"host synchronisation: boolean-mask indexing inside {where}")
        return original_getitem(self, index)

    with monkeypatch.context() as patch:
        for name in SYNCING_METHODS:
            patch.setattr(torch.Tensor, name, forbidden(name))
        patch.setattr(torch.Tensor, "__getitem__", getitem)
        yield
