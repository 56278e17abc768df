"""Tests of hf_gns_spam.integrations: the Trainer optimizer names, bitsandbytes on CPU, known warnings."""
