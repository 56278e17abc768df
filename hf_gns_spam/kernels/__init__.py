"""Triton kernels: the fused GNS-aware normalization forward and backward (see :mod:`.gns_norm`)."""

from hf_gns_spam.kernels.gns_norm import gns_norm_backward, gns_norm_forward

__all__ = ["gns_norm_backward", "gns_norm_forward"]
