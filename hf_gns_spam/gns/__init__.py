"""Gradient noise scale: the estimator and the Trainer callback.

Lazy in the package's way (PEP 562, see :mod:`hf_gns_spam`): the public names are imported from their modules on
first use, so that importing this package, or one of its torch-free modules (:mod:`~hf_gns_spam.gns.arguments`,
:mod:`~hf_gns_spam.gns.schedule`, :mod:`~hf_gns_spam.gns.estimator`, :mod:`~hf_gns_spam.gns.accumulation`), imports
neither torch nor transformers: the launcher checks its options with :class:`GNSConfig` before the
script imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hf_gns_spam.lazy_import import lazy_attributes

# public name -> the module it is imported from on first use
_LAZY_NAMES = {
    "GNSCallback": "hf_gns_spam.gns.callback",
    "GNSConfig": "hf_gns_spam.gns.arguments",
    "GradientNoiseScale": "hf_gns_spam.gns.estimator",
    "effective_batch_size": "hf_gns_spam.gns.estimator",
    "unbiased_estimates": "hf_gns_spam.gns.estimator",
}

__all__ = [
    "GNSCallback",
    "GNSConfig",
    "GradientNoiseScale",
    "effective_batch_size",
    "unbiased_estimates",
]

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports these
    from hf_gns_spam.gns.arguments import GNSConfig
    from hf_gns_spam.gns.callback import GNSCallback
    from hf_gns_spam.gns.estimator import GradientNoiseScale, effective_batch_size, unbiased_estimates


__getattr__, __dir__ = lazy_attributes(globals(), _LAZY_NAMES)
