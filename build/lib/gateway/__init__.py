"""Inference gateway: serves the federated model to clinicians with auth, limits, privacy budgets and audit."""
