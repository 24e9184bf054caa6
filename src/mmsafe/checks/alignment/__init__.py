"""Alignment checks: jailbreaks, hallucination and the judges of generative VLMs."""
