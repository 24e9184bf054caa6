"""Checks of the ``controllability`` pillar."""
