"""Tests of hf_gns_spam.gns: the estimator, the schedules, the accumulation controller, the norm groups."""
