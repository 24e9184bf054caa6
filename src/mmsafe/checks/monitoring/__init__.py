"""Checks of the ``monitoring`` pillar."""
