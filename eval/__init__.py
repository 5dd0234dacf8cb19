"""Evaluation for npo_min, split by purpose: `eval.benchmark` (the class-conditional digits benchmark: reward
classifier, evaluate, results), `eval.t2i` (the text-to-image preference scorers), `eval.metrics` (shared metrics)."""
