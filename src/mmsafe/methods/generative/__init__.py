"""Methods of the text-to-image generator checks (quality, memorization, ...)."""
