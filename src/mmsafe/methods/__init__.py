"""The science, as pure functions grouped by topic.

Attacks, perturbations, conformal prediction, OOD scores, anomaly detection, failure slices,
explanations, privacy, efficiency and adaptation. Checks and hardeners are thin over them.
"""
