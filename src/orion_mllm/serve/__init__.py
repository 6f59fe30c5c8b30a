"""Serving: the OpenAI-compatible HTTP API (and, later, the web chat) over the inference pipeline."""
