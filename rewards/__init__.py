"""Rewards: the plugin API, the CLIP reconstruction reward and the judged caption reward."""
