"""Triton kernels (importing them needs triton) and the contracts they implement (plain torch).

* :mod:`.norm_contract`: what the GNS-aware normalization computes and the layout of its statistics;
* :mod:`.gns_norm`: the fused normalization forward and backward with per-example statistics;
* :mod:`.stable_spam_step`: the fused Stable-SPAM step.

Nothing here imports from the layers above (``ops``, ``optim``, ``gns``, ``integrations``, ``patching``), and this
``__init__`` imports no kernel, so that the contracts load without triton.
"""
