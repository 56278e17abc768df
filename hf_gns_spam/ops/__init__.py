"""Operators: the GNS-aware normalization (pure-torch reference, Triton dispatch, torch.library registration)."""
