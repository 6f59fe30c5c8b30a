"""orion-mllm: monolithic unified multimodal models on Qwen2.5-VL, trained the ORION way.

One backbone understands images (text out) and generates them (continuous visual tokens regressed
by a vision head, rendered by a diffusion decoder), kept from forgetting by a KL representation
consistency loss against a frozen copy of itself.
"""

__version__ = "0.1.0"
