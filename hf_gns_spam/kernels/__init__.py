"""Triton kernels (importing them needs triton) and the contracts and tables they implement (no triton).

* :mod:`.norm_contract`: what the GNS-aware normalization computes and the layout of its statistics;
* :mod:`.norm_variants`: the table of normalization variants (one row per family);
* :mod:`.step_contract`: the table of optimizer-state formats (one row per ``state_bits``) and the step's inputs;
* :mod:`.gns_norm`: the fused normalization forward and backward with per-example statistics;
* :mod:`.stable_spam_step`: the fused Stable-SPAM step.

Nothing here imports from the layers above (``ops``, ``optim``, ``gns``, ``integrations``, ``patching``), and this
``__init__`` imports no kernel, so that the contracts load without triton.
"""
