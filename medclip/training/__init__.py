"""Pretraining engine: recipes, distributed setup, optimisation, checkpoints, logging."""
