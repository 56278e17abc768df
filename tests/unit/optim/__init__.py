"""Tests of hf_gns_spam.optim: StableSPAM, its quantized states and faults."""
