"""npo_min: a minimal reference implementation of Self-NPO and Diffusion-NPO."""
