"""Evaluation: ShapesWorld benchmarks (GenEval-style generation, understanding, editing)."""
