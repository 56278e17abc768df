"""Tests of hf_gns_spam.kernels: the Triton kernels (interpreter on CPU) and their tables."""
