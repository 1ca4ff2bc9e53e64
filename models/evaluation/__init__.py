"""Evaluation: the small trained video DiT and its clips, the quality runner, comparisons, media."""
