"""Checks of the ``robustness`` pillar."""
