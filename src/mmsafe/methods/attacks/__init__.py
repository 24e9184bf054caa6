"""Adversarial attacks: pixel-space (``pixel``) and text-side (``text``)."""
