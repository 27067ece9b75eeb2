"""Evaluation across sequence lengths, plots, and the ``eval`` recipe section."""
