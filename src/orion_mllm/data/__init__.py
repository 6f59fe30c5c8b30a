"""Datasets: conversation formats, prompt templates, validation, and the embedded ShapesWorld."""
