"""Inference: the generation engine, chat sessions and the user-facing pipeline."""
