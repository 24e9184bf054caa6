"""Checks of the ``performance`` pillar."""
