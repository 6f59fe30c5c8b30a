"""Serving: the web chat (Gradio) and the OpenAI-compatible HTTP API over the inference pipeline."""
