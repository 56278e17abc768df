"""Tests of hf_gns_spam.ops: the GNS norm operator, both backends."""
