"""Loss kernels behind ``orion_mllm.losses``: the chunked fused-linear autograd Functions
(``chunked``), the Liger adapter (``liger``) and the naive full-logit reference with the input
checks every backend shares (``reference``). Only ``losses`` imports them.
"""
