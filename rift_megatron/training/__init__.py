"""Megatron-Core training: set-up, the RIFT step, checkpoints."""
