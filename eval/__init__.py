"""Evaluation for npo_min: the digit reward classifier and the metrics (reward, Frechet distance, win rate)."""
