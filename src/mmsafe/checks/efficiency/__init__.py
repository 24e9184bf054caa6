"""Checks of the ``efficiency`` pillar."""
