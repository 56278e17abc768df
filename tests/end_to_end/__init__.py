"""End-to-end tests: real Trainer runs, torchrun (DDP, FSDP), the launcher, the examples, TRL and peft."""
