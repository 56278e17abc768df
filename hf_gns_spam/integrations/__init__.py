"""Glue between hf_gns_spam and the Hugging Face libraries."""
