"""Pieces of the one shared training loop (train.py): optimizer, checkpoints, metrics, loop."""
