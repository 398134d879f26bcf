"""Rollouts: caption groups from the encoder, SDE denoising trajectories from the decoder."""
