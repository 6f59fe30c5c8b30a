"""``orion eval geneval``: generate images for GenEval's prompt file in the folder layout its scorer reads.

GenEval (Ghosh et al., 2023) scores text-to-image models by detecting objects in their images; its
scorer (``evaluation/evaluate_images.py IMAGEDIR``, mmdetection + Mask2Former) reads::

    <outdir>/<5-digit index>/metadata.jsonl    that prompt's line of the metadata file, unchanged
    <outdir>/<5-digit index>/samples/0000.png  the first image generated for it, 0001.png, ...

one folder per line of the metadata file, in order. This module writes exactly that. GenEval's own
prompt file (553 prompts, MIT, credited in ``geneval_prompts/SOURCE.md``) ships with the package, so
the export works offline without ``--metadata``.

The export is resumable: a folder whose ``metadata.jsonl`` equals its line and which holds every asked
sample is skipped; a folder is finished only once its ``metadata.jsonl`` is written, after its images.
A folder holding another prompt is never overwritten (a clear error instead). Each image's decoder
noise comes from its own seed (``seed + index * n_samples + k``), so an interrupted and resumed export
gives the images an uninterrupted one would. The regressed tokens of a prompt are deterministic (the
vision head regresses a mean): its samples differ only by the decoder's noise.

When every prompt names only ShapesWorld shapes and colours (``orion eval shapes-gen
--write-metadata``), ``orion eval shapes-score`` scores the folder with the pixel scorer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from orion_mllm.inference.pipeline import OrionPipeline


@dataclass(frozen=True)
class GenEvalPrompt:
    """One line of a GenEval metadata file: its text exactly as written, parsed, and its 0-based index."""

    index: int
    line: str
    meta: dict[str, Any]

    @property
    def prompt(self) -> str:
        return self.meta["prompt"]


def default_metadata() -> Path:
    """GenEval's own prompt file, shipped in the package."""
    return Path(str(resources.files("orion_mllm.eval") / "geneval_prompts" / "evaluation_metadata.jsonl"))


def read_metadata(path: str | Path) -> list[GenEvalPrompt]:
    """Every line of a GenEval metadata file; a line that is not a JSON object with a non-empty string
    ``prompt`` is refused with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metadata file")
    prompts: list[GenEvalPrompt] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue  # GenEval's own reader skips blank lines too (a trailing newline)
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(meta, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object, got {type(meta).__name__}")
        prompt = meta.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path} line {number}: field 'prompt' must be a non-empty string ({prompt!r})")
        prompts.append(GenEvalPrompt(len(prompts), line, meta))
    if not prompts:
        raise ValueError(f"{path}: no prompts (empty file)")
    return prompts


def sample_name(k: int) -> str:
    return f"{k:04d}.png"


def folder_state(folder: Path, prompt: GenEvalPrompt, n_samples: int, source: str) -> bool:
    """True when ``folder`` already holds this prompt with all ``n_samples`` images (skip it); False
    when it is absent or unfinished (write it). A folder holding another prompt raises: the export
    never overwrites what may be another run's results."""
    meta_file = folder / "metadata.jsonl"
    if not meta_file.is_file():
        return False
    held = meta_file.read_text(encoding="utf-8").strip()
    if held != prompt.line:
        raise ValueError(
            f"{meta_file} holds another prompt than line {prompt.index + 1} of {source} "
            f"({held[:60]!r}...): export into an empty or matching --out folder"
        )
    return all((folder / "samples" / sample_name(k)).is_file() for k in range(n_samples))


def pending(
    prompts: list[GenEvalPrompt], out: str | Path, n_samples: int, source: str
) -> list[GenEvalPrompt]:
    """The prompts whose folder under ``out`` is absent or unfinished; raises (``folder_state``) on a
    folder holding another prompt, before any model is loaded or image written."""
    return [p for p in prompts if not folder_state(Path(out) / f"{p.index:05d}", p, n_samples, source)]


def export_geneval(
    pipe: OrionPipeline, prompts: list[GenEvalPrompt], out: str | Path, *, n_samples: int = 4,
    batch_size: int = 8, seed: int = 0, guidance: float | None = None, source: str = "metadata",
    progress: bool = True,
) -> dict[str, int]:  # fmt: skip
    """Write GenEval's layout under ``out`` for ``prompts``: per prompt, ``n_samples`` images rendered
    from the model's regressed tokens. Returns how many prompts were written and skipped."""
    from orion_mllm.eval.model_eval import regress_tokens

    if n_samples < 1:
        raise ValueError(f"--n-samples {n_samples}: need at least one image per prompt")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be at least 1")
    if pipe.decoder is None:
        from orion_mllm.inference.pipeline import NO_DECODER

        raise ValueError(NO_DECODER)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = pending(prompts, out, n_samples, source)
    skipped = len(prompts) - len(todo)
    bar = tqdm(total=len(prompts), initial=skipped, desc="geneval", unit="prompt", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        # Token regression is batched over prompts; the seed only matters for sampled text (none here).
        tokens = regress_tokens(
            pipe, [p.prompt for p in chunk], batch_size=batch_size, seed=seed, progress=False,
            guidance=guidance,
        )  # fmt: skip
        # Only the missing samples: images an interrupted run already wrote are kept as they are. The
        # chunk's images are rendered in one decoder batch, each from its own seed.
        jobs = []  # (where the image goes, its seed, its tokens)
        for p, t in zip(chunk, tokens, strict=True):
            samples = out / f"{p.index:05d}" / "samples"
            samples.mkdir(parents=True, exist_ok=True)
            for k in range(n_samples):
                if not (samples / sample_name(k)).is_file():
                    jobs.append((samples / sample_name(k), seed + p.index * n_samples + k, t))
        if jobs:
            images = pipe.render([t for _, _, t in jobs], seeds=[s for _, s, _ in jobs])
            for (path, _, _), image in zip(jobs, images, strict=True):
                image.save(path)
        for p in chunk:
            # Written last: its presence with every sample is what marks the prompt finished.
            (out / f"{p.index:05d}" / "metadata.jsonl").write_text(p.line + "\n", encoding="utf-8")
            bar.update()
    bar.close()
    return {
        "prompts": len(prompts),
        "written": len(todo),
        "skipped": skipped,
        "samples_per_prompt": n_samples,
    }


__all__ = ["GenEvalPrompt", "default_metadata", "export_geneval", "folder_state", "pending", "read_metadata"]
