"""Re-parameterization: reparameterize(), reparameterize_model, safe fusing, verify."""
