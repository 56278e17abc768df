"""Lazy package attributes (PEP 562), for ``hf_gns_spam`` and ``hf_gns_spam.gns``: a package's public names are
imported from their modules on first use (``from package import Name`` included), and so are its submodules
(``package.submodule`` after ``import package``), so that importing the package imports neither torch nor
transformers. Each value is kept in the package's namespace once imported."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package_globals: dict[str, Any], names: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of the package whose ``globals()`` is ``package_globals``, where
    ``names`` maps each public name to the module it is imported from."""
    package = package_globals["__name__"]

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            package_globals[name] = value
            return value
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")  # which sets the attribute
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*package_globals, *names})

    return __getattr__, __dir__
