"""Evolutionary search of time steps (stage 1) and per-step layer skipping (stage 2) on Optuna."""
