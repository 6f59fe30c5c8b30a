"""Training: stage recipes. The trainer, data pipeline, FSDP2 and checkpointing are still to come."""
