"""The ``generative`` pillar: checks of text-to-image generators (responsible generation)."""
