"""Semantic drift (paper Figure 3): what the text head says at visual positions, base vs trained model.

At the positions the KL consistency loss covers (each position whose next token is a visual token:
``<|vision_start|>``, ``v_1`` ... ``v_{N-1}`` of a generated image, teacher-forced with the image's
ground-truth tokens), both models' LM heads give a distribution over the vocabulary. Drift is
measured by KL(base || model) per position (the loss's direction) and by the overlap of the two
top-k token sets. Naive generative fine-tuning makes the model's predictions there collapse into
nonsense (large KL, small overlap); the KL loss is meant to keep them.

``DriftProbe`` holds a fixed batch of held-out images (built by ``train/drift_probe.py``, whose
batches the trainer also uses to log ``drift_kl`` during stages 2-3) and measures it; ``orion eval
drift`` writes a table and a figure (``drift.md``, ``drift.png``, ``drift.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orion_mllm.model.orion import OrionModel, backbone_hidden_states
from orion_mllm.sequence import Batch
from orion_mllm.train.drift_probe import probe_batches

HiddenFn = Callable[[Batch, torch.Tensor | None], torch.Tensor]  # final hidden states [B, S, d]
GENERIC_PROMPT = "Draw a picture."


@dataclass
class DriftStats:
    """Per-position KL(base || model) and top-k overlap, plus both models' top-k tokens."""

    k: int
    kl: torch.Tensor  # [P]
    overlap: torch.Tensor  # [P] |top-k(base) ∩ top-k(model)| / k
    token_index: torch.Tensor  # [P] 0 = the <|vision_start|> position, j = the position of v_j
    base_top: torch.Tensor  # [P, k] token ids
    model_top: torch.Tensor  # [P, k]
    base_top_p: torch.Tensor  # [P, k] probabilities
    model_top_p: torch.Tensor  # [P, k]
    sample: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [P]

    def summary(self) -> dict[str, float]:
        return {
            "drift_kl": float(self.kl.mean()) if self.kl.numel() else 0.0,
            "drift_kl_median": float(self.kl.median()) if self.kl.numel() else 0.0,
            f"drift_top{self.k}_overlap": float(self.overlap.mean()) if self.overlap.numel() else 1.0,
            "positions": int(self.kl.numel()),
        }

    def per_index(self) -> list[dict[str, float]]:
        """Mean KL and overlap per visual-token index (0 = the position before v_1)."""
        rows = []
        for j in sorted(set(self.token_index.tolist())):
            sel = self.token_index == j
            rows.append(
                {"index": j, "kl": float(self.kl[sel].mean()), "overlap": float(self.overlap[sel].mean())}
            )
        return rows


def compare_logits(
    base_logits: torch.Tensor, model_logits: torch.Tensor, k: int = 5
) -> tuple[torch.Tensor, ...]:
    """(KL(base || model) [P], top-k overlap [P], base top-k ids, model top-k ids, their probabilities)."""
    base_lp = torch.log_softmax(base_logits.float(), -1)
    model_lp = torch.log_softmax(model_logits.float(), -1)
    # Zero-probability entries of the base contribute 0 (p log p -> 0), which exp() gives exactly.
    kl = (base_lp.exp() * (base_lp - model_lp)).sum(-1).clamp_min(0.0)
    k = min(k, base_logits.shape[-1])
    bp, bi = base_lp.exp().topk(k, -1)
    mp, mi = model_lp.exp().topk(k, -1)
    overlap = (bi.unsqueeze(-1) == mi.unsqueeze(-2)).any(-1).float().mean(-1)
    return kl, overlap, bi, mi, bp, mp


def visual_logits(
    hidden: torch.Tensor, lm_head: torch.Tensor, batch: Batch, chunk: int = 256
) -> torch.Tensor:
    """LM-head logits [P, V] at the batch's visual positions (gathered first, then chunked)."""
    rows, cols = batch.visual_positions[:, 0], batch.visual_positions[:, 1]
    h = hidden[rows, cols].float()
    w = lm_head.float()
    return torch.cat([h[i : i + chunk] @ w.T for i in range(0, h.shape[0], chunk)]) if h.shape[0] else h @ w.T


def _token_index(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per visual position: its index within its image (0 .. N-1) and the row it belongs to."""
    rows = batch.visual_positions[:, 0]
    index = torch.zeros_like(rows)
    for r in rows.unique():
        sel = (rows == r).nonzero(as_tuple=True)[0]
        cols = batch.visual_positions[sel, 1]
        # Positions of one row are in order; an image's run restarts after each <|vision_start|>.
        starts = torch.ones_like(cols, dtype=torch.bool)
        starts[1:] = cols[1:] != cols[:-1] + 1
        run = torch.cumsum(starts.long(), 0)
        first = {int(g): int((run == g).nonzero()[0]) for g in run.unique()}
        index[sel] = torch.tensor([i - first[int(g)] for i, g in enumerate(run.tolist())], dtype=index.dtype)
    return index, rows


class DriftProbe:
    """A fixed batch of images at visual positions; ``measure`` compares two models on it."""

    def __init__(self, batches: list[Batch], k: int = 5) -> None:
        if not batches:
            raise ValueError("drift probe: no images to probe")
        self.batches = batches
        self.k = k

    @classmethod
    def from_records(
        cls, model: OrionModel, records: Sequence[dict[str, Any]], *, batch_size: int = 16, k: int = 5
    ) -> DriftProbe:
        """Conversation records whose assistant turn is an image (image paths absolute or PIL)."""
        return cls(probe_batches(model, records, batch_size=batch_size), k)

    @torch.no_grad()
    def measure(
        self,
        base_hidden: HiddenFn,
        base_head: torch.Tensor,
        model_hidden: HiddenFn,
        model_head: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> DriftStats:
        parts: list[tuple[torch.Tensor, ...]] = []
        for n, batch in enumerate(self.batches):
            b = batch.to(device)
            tokens = b.visual_tokens
            base_logits = visual_logits(base_hidden(b, tokens), base_head, b)
            model_logits = visual_logits(model_hidden(b, tokens), model_head, b)
            index, rows = _token_index(b)
            parts.append(
                (*compare_logits(base_logits, model_logits, self.k), index.cpu(), rows.cpu() + n * 10_000)
            )
        cat = [torch.cat([p[i].cpu() for p in parts]) for i in range(len(parts[0]))]
        kl, overlap, bi, mi, bp, mp, index, sample = cat
        return DriftStats(self.k, kl, overlap, index, bi, mi, bp, mp, sample)


def backbone_hidden_fn(backbone) -> HiddenFn:
    return lambda batch, tokens: backbone_hidden_states(backbone, batch, tokens)[0]


def generation_records(path: str | Path, limit: int, *, prompt: str = GENERIC_PROMPT) -> list[dict[str, Any]]:
    """Probe records from a JSONL of conversation records (image paths relative to its folder), or
    from a folder of images (each the assistant's answer to ``prompt``); the first ``limit``."""
    from orion_mllm.data.sources import ConversationSource

    path = Path(path)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not images:
            raise ValueError(f"--images {path}: no .png/.jpg/.webp images in the folder")
        return [
            {"id": p.name, "image": str(p.resolve()),
             "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "<image>"}]}
            for p in images[:limit]
        ]  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"--images {path}: no such file or folder")
    source = ConversationSource("drift", "generation", path, path.parent)
    return [source.get(i).record for i in range(min(limit, len(source)))]


def write_drift_report(
    stats: DriftStats, out: str | Path, decode: Callable[[int], str], *, title: str
) -> dict:
    """``drift.json`` (summary + per index), ``drift.md`` (table + example top-k tokens), ``drift.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = stats.summary()
    per_index = stats.per_index()
    (out / "drift.json").write_text(json.dumps({**summary, "per_index": per_index}, indent=2) + "\n")
    k = stats.k
    lines = [
        f"# Semantic drift: {title}",
        "",
        f"KL(base || model) at {summary['positions']} visual positions: mean **{summary['drift_kl']:.4f}**, "
        f"median {summary['drift_kl_median']:.4f}; "
        f"top-{k} overlap **{summary[f'drift_top{k}_overlap']:.3f}**.",
        "",
        "| visual index | KL(base ‖ model) | top-k overlap |",
        "| --- | --- | --- |",
        *(f"| {r['index']} | {r['kl']:.4f} | {r['overlap']:.3f} |" for r in per_index),
        "",
        f"Top-{k} tokens of the text head at the first image's positions (probability):",
        "",
        "| index | base | model | KL |",
        "| --- | --- | --- | --- |",
    ]

    def fmt(ids: torch.Tensor, probs: torch.Tensor) -> str:
        return ", ".join(f"`{decode(int(t))!r}` {float(p):.2f}" for t, p in zip(ids, probs, strict=True))

    first = (stats.sample == stats.sample[0]).nonzero(as_tuple=True)[0] if stats.sample.numel() else []
    for i in list(first)[:12]:
        lines.append(
            f"| {int(stats.token_index[i])} | {fmt(stats.base_top[i], stats.base_top_p[i])} | "
            f"{fmt(stats.model_top[i], stats.model_top_p[i])} | {float(stats.kl[i]):.3f} |"
        )
    (out / "drift.md").write_text("\n".join(lines) + "\n")
    plot_drift(stats, out / "drift.png", title=title)
    return summary


def plot_drift(stats: DriftStats, path: str | Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_index = stats.per_index()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    idx = [r["index"] for r in per_index]
    axes[0].bar(idx, [r["kl"] for r in per_index], color="#c0504d")
    axes[0].set(
        xlabel="visual token index (0 = before v1)", ylabel="KL(base || model)", title="KL per position"
    )
    axes[1].bar(idx, [r["overlap"] for r in per_index], color="#4f81bd")
    axes[1].set(xlabel="visual token index", ylabel=f"top-{stats.k} overlap", ylim=(0, 1.05),
                title="top-k agreement")  # fmt: skip
    axes[2].hist(stats.kl.numpy(), bins=30, color="#9bbb59")
    axes[2].set(xlabel="KL per position", ylabel="positions", title="distribution")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = [
    "DriftProbe",
    "DriftStats",
    "backbone_hidden_fn",
    "compare_logits",
    "generation_records",
    "plot_drift",
    "visual_logits",
    "write_drift_report",
]
