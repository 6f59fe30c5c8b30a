"""Training: stage recipes and their setup, the step data pipeline, the optimizer step, the stage and
decoder trainers, FSDP2 via torchrun, checkpoints with auto-resume, metrics (docs/ARCHITECTURE.md)."""
