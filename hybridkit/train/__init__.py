"""Training: trainer, optimiser, checkpoints, distributed helpers."""
