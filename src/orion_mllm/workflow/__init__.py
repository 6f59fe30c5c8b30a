"""Multi-step jobs built from the trainer, the inference pipeline and the evaluations:
``orion quickstart`` (``quickstart.py``, ``report.py``), ``orion ablate`` (``ablate.py``) and the model
evaluation they share (``evaluate.py``)."""
