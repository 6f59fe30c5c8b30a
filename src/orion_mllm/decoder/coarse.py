"""Closed-form fit of a pixel-space decoder's coarse estimate (``DecoderConfig.coarse_rank``).

The coarse estimate is ridge regression from all of an image's visual tokens (flattened, centred and
scaled per feature) to its pixels, truncated to ``coarse_rank`` by SVD so it is stored as two small
linear layers. The fit streams batches: only the sufficient statistics (``X^T X``, ``X^T Y`` and the
sums) are kept, so the number of fitting images is not limited by memory.
"""

from __future__ import annotations

import torch

from orion_mllm.decoder.model import OrionDecoder


class CoarseFit:
    """Accumulates the statistics of (tokens, latents) pairs, then writes the solution into a decoder."""

    def __init__(self, decoder: OrionDecoder) -> None:
        c = decoder.config
        if not c.coarse_rank:
            raise ValueError("decoder has coarse_rank=0: nothing to fit")
        self.decoder = decoder
        features = c.num_tokens * c.token_dim
        outputs = c.latent_channels * c.latent_size**2
        # float64: X^T X of a few thousand images is ill-conditioned enough to matter in fp32.
        self.xtx = torch.zeros(features, features, dtype=torch.float64)
        self.xty = torch.zeros(features, outputs, dtype=torch.float64)
        self.x_sum = torch.zeros(features, dtype=torch.float64)
        self.y_sum = torch.zeros(outputs, dtype=torch.float64)
        self.y_ssq = torch.zeros((), dtype=torch.float64)
        self.count = 0

    def update(self, tokens: torch.Tensor, latents: torch.Tensor) -> None:
        """Add a batch: tokens [B, N, d] and the matching clean latents [B, C, h, w]."""
        self.decoder.check_tokens(tokens)
        x = tokens.detach().reshape(tokens.shape[0], -1).to("cpu", torch.float32)
        y = latents.detach().reshape(latents.shape[0], -1).to("cpu", torch.float32)
        if y.shape[1] != self.y_sum.numel():
            raise ValueError(f"latents: expected {self.y_sum.numel()} values per image, got {y.shape[1]}")
        # Each batch's products in fp32 (the fit's main cost; a few hundred rows keep the rounding far
        # below the ridge penalty), summed across batches in fp64.
        xd = x.double()
        self.xtx += xd.T @ xd  # the small product in fp64: the centring below subtracts large terms
        self.xty += (x.T @ y).double()
        self.x_sum += x.double().sum(0)
        self.y_sum += y.double().sum(0)
        self.y_ssq += (y.double() ** 2).sum()
        self.count += x.shape[0]

    @torch.no_grad()
    def solve(self, ridge: float = 1e-4) -> dict[str, float]:
        """Solve the ridge system (penalty ``ridge`` x images, on standardised features), truncate it to
        the decoder's rank and load it; returns the fit's training R^2 and the share of the solution's
        energy kept by the truncation."""
        n = self.count
        if n < 2:
            raise ValueError(f"coarse fit: need at least 2 images, got {n}")
        mx, my = self.x_sum / n, self.y_sum / n
        cov_xx = self.xtx - n * torch.outer(mx, mx)
        cov_xy = self.xty - n * torch.outer(mx, my)
        sd = (cov_xx.diagonal() / (n - 1)).clamp(min=0).sqrt() + 1e-6
        a = cov_xx / torch.outer(sd, sd)
        a.diagonal().add_(ridge * n)
        # A = V diag(lam) V^T. In exact arithmetic lam >= ridge * n; rounding in the centred statistics
        # can push a few below it (duplicated images, near-constant token features), so they are
        # floored there: the solve and the square root below stay well defined.
        lam, vecs = torch.linalg.eigh(a)
        lam = lam.clamp(min=ridge * n)
        w = vecs @ ((vecs.T @ (cov_xy / sd.unsqueeze(1))) / lam.unsqueeze(1))  # on standardised features
        # Reduced-rank regression: keep the r output directions that carry most of the *fitted*
        # values (top right singular vectors of A^(1/2) W), the best rank-r map in squared error;
        # truncating W's own SVD would keep directions the features barely excite.
        root_a = (vecs * lam.sqrt()) @ vecs.T
        _, s, vh = torch.linalg.svd(root_a @ w, full_matrices=False)
        r = min(self.decoder.config.coarse_rank, s.numel())
        basis = vh[:r].T  # outputs x r, orthonormal
        w_in = (w @ basis) / sd.unsqueeze(1)  # folds the per-feature scaling into the first layer
        w_out = basis
        dec = self.decoder
        dec.coarse_token_mean.copy_(mx.to(dec.coarse_token_mean))
        dec.coarse_in.weight.zero_()
        dec.coarse_in.weight[:r].copy_(w_in.T.to(dec.coarse_in.weight))
        dec.coarse_out.weight.zero_()
        dec.coarse_out.weight[:, :r].copy_(w_out.to(dec.coarse_out.weight))
        dec.coarse_out.bias.copy_(my.to(dec.coarse_out.bias))
        # Training R^2 of the truncated map from the statistics alone (W = w_in w_out^T, kept low-rank):
        # SSE = sum(yc^2) - 2 tr(W^T C_xy) + tr(W^T C_xx W).
        sst = self.y_ssq - n * (my * my).sum()
        cross = ((w_in.T @ cov_xy) * w_out.T).sum()
        quad = ((w_in.T @ cov_xx @ w_in) * (w_out.T @ w_out)).sum()
        r2 = float(1 - (sst - 2 * cross + quad) / sst.clamp(min=1e-30))
        kept = float((s[:r] ** 2).sum() / (s**2).sum().clamp(min=1e-30))
        return {"images": float(n), "train_r2": r2, "rank_energy_kept": kept}
