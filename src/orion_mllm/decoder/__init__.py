"""Diffusion decoder: visual tokens -> pixels (network, flow-matching sampler, coarse fit, conversion).

Its training run is ``orion_mllm.train.decoder_trainer`` (beside the stage trainer)."""
