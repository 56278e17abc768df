"""Tests of one package module each (no Trainer.train() end to end), in folders mirroring hf_gns_spam/."""
