"""Diffusion decoder: visual tokens -> pixels (model, flow matching, training, conversion)."""
