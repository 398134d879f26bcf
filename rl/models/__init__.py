"""Model builders: encoder (LVLM), connector, decoder (DiT + VAE), with tiny configs for CPU."""
