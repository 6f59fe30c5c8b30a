"""Run a model through ShapesWorld's benchmarks: ``shapes-und``, ``shapes-gen`` and ``shapes-edit``.

The scorers (``shapes_und_edit``, ``shapes_gen``) take a callable standing for the model and ask it
one question at a time; here the questions are collected first (they never depend on earlier
answers: dialogues are asked with the gold history), answered in batches by the inference engine
(greedy, so a batch gives what one-at-a-time would), and handed back to the scorer.

The evaluation records come from ``eval_set``: ShapesWorld files written with a seed no training
recipe uses (``EVAL_SEED``), so the images and questions are held out from training.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from orion_mllm.data.records import encode_record
from orion_mllm.data.shapes.datasets import (
    Holdout,
    canonical_caption,
    recorded_settings,
    write_shapes_dataset,
)
from orion_mllm.data.shapes.scorer import Spec, judge, score_judgments
from orion_mllm.eval.shapes_gen import GenPrompt, prompt_set, score_folder
from orion_mllm.eval.shapes_und_edit import normalise, score_edits, score_understanding
from orion_mllm.images import load_image
from orion_mllm.inference.engine import SamplingConfig
from orion_mllm.inference.pipeline import OrionPipeline
from orion_mllm.inference.session import ChatSession, GeneratedImage, UserImage
from orion_mllm.model.orion import backbone_hidden_states
from orion_mllm.sequence import EncodedConversation, attach_visual_tokens, collate

EVAL_SEED = 90_210  # no recipe generates training data with this seed
IMAGE_PLACEHOLDER = "<image>"


def eval_set(
    root: str | Path, *, size: int, n_und: int = 200, n_edit: int = 200, n_interleaved: int = 50,
    progress: bool = True,
) -> Path:  # fmt: skip
    """The held-out evaluation records under ``root``, with at least the asked-for counts.

    Written on first use (seed ``EVAL_SEED``, ShapesWorld's default hold-out). An existing set of the
    same seed and size with enough records is reused as it is, whatever hold-out it was written with
    (sets from before the caption hold-out keep the colour-shape pairs out of their images); a smaller
    one is rewritten larger with its own hold-out and add layout (the same seed and settings give the
    same first records, so nothing is lost); anything else in ``root`` is refused, never overwritten.
    (The scorer accepts an added object anywhere, so the add layout does not change what is right.)"""
    root = Path(root)
    meta_file = root / "meta.json"
    want = {"und": n_und, "edit": n_edit, "interleaved": n_interleaved}
    holdout, add_layout = "captions", "canonical"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("seed") != EVAL_SEED or meta.get("size") != size:
            raise ValueError(
                f"{root} holds ShapesWorld data with seed {meta.get('seed')} and size {meta.get('size')}, "
                f"not the evaluation set (seed {EVAL_SEED}, size {size}): choose another folder"
            )
        counts = meta.get("counts", {})
        if all(counts.get(k, 0) >= v for k, v in want.items()):
            return root
        want = {k: max(v, counts.get(k, 0)) for k, v in want.items()}
        recorded = recorded_settings(meta) or {}
        holdout, add_layout = recorded.get("holdout", "pairs"), recorded.get("add_layout", "random")
    elif root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty and holds no ShapesWorld meta.json: choose another folder")
    write_shapes_dataset(
        root, size=size, n_und=want["und"], n_gen=0, n_edit=want["edit"], n_interleaved=want["interleaved"],
        n_heldout=100, seed=EVAL_SEED, holdout=holdout, add_layout=add_layout, progress=progress,
    )  # fmt: skip
    return root


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: evaluation records not found")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def session_from_turns(image: Image.Image, turns: Sequence[dict[str, str]]) -> ChatSession:
    """A chat session from LLaVA-form turns whose first human turn holds ``<image>``: at its start
    (``<image>\nQ``, as ShapesWorld writes) or anywhere else (``Q\n<image>``: the text before it is
    kept as written, and nothing follows the picture, so the prompt reads as training read the record;
    the pipeline's ``image_separator`` restores the newline of a text after the picture)."""
    session = ChatSession()
    for k, turn in enumerate(turns):
        role = "user" if turn["from"] == "human" else "assistant"
        text = turn["value"]
        if k == 0 and IMAGE_PLACEHOLDER in text:
            before, after = text.split(IMAGE_PLACEHOLDER, 1)
            after = after.lstrip("\n")
            session.add(role, [*([before] if before else []), UserImage(image), *([after] if after else [])])
        else:
            session.add(role, [text])
    return session


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def answer_many(
    pipe: OrionPipeline, queries: Sequence[tuple[Path, list[dict[str, str]]]], *, batch_size: int = 32,
    max_new_tokens: int = 48, progress: bool = True, desc: str = "answering",
) -> list[str]:  # fmt: skip
    """Greedy answers to (image path, LLaVA turns ending with a question), batched."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, allow_images=False)
    images: dict[Path, Image.Image] = {}
    answers: list[str] = []
    bar = tqdm(total=len(queries), desc=desc, disable=not progress)
    for chunk in _batches(queries, batch_size):
        prompts = []
        for path, turns in chunk:
            if path not in images:
                images[path] = load_image(path)
            prompts.append(pipe.prompt(session_from_turns(images[path], turns)))
        with torch.no_grad():
            outs = pipe.engine.generate(prompts, sampling)
        answers.extend(pipe.reply_from(o).text.strip() for o in outs)
        bar.update(len(chunk))
    bar.close()
    return answers


def eval_understanding(
    pipe: OrionPipeline, records: Sequence[dict[str, Any]], root: str | Path, *, batch_size: int = 32,
    progress: bool = True, question_first: bool = False,
) -> dict[str, float]:  # fmt: skip
    """``shapes-und`` accuracy per question type and ``overall`` (see ``score_understanding``), with
    ``question_first``: the picture after the first question, for a model trained so."""
    asked: list[tuple[Path, list[dict[str, str]]]] = []

    def record_question(image: Path, turns: list[dict[str, str]]) -> str:
        asked.append((image, [dict(t) for t in turns]))
        return ""

    score_understanding(records, root, record_question, question_first)  # pass 1: the questions, in order
    answers = iter(answer_many(pipe, asked, batch_size=batch_size, progress=progress, desc="shapes-und"))
    return score_understanding(records, root, lambda image, turns: next(answers), question_first)


def regress_tokens(
    pipe: OrionPipeline, requests: Sequence[str], *, sources: Sequence[Image.Image] | None = None,
    batch_size: int = 32, seed: int = 0, progress: bool = True, desc: str = "regressing",
    guidance: float | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """The visual tokens [N, d] of one image per request (an edit of ``sources[k]`` when given)."""
    tokens: list[torch.Tensor] = []
    bar = tqdm(total=len(requests), desc=desc, disable=not progress)
    for start in range(0, len(requests), batch_size):
        chunk = list(requests[start : start + batch_size])
        srcs = None if sources is None else list(sources[start : start + batch_size])
        prompts = pipe.image_prompts(chunk, seed=seed + start, sources=srcs, guidance=guidance)
        with torch.no_grad():
            outs = pipe.engine.generate(prompts, SamplingConfig(max_new_tokens=1, allow_images=False))
        tokens.extend(o.images[0] for o in outs)
        bar.update(len(chunk))
    bar.close()
    return tokens


@torch.no_grad()
def teacher_forced_tokens(
    pipe: OrionPipeline, records: Sequence[dict[str, Any]]
) -> tuple[torch.Tensor, list[EncodedConversation]]:
    """One teacher-forced pass over ``records`` (true visual tokens fed as inputs, as in training):
    the vision head's predictions at every generated-image position [n, d] (records in order), and
    the encoded records, whose ``visual_tokens`` hold every image's true tokens in order."""
    m = pipe.model
    builder = m.sequence_builder()
    enc = [attach_visual_tokens(encode_record(builder, r), m.encode_images) for r in records]
    batch = collate(enc, m.processor.tokenizer.pad_token_id)
    sources = m.batch_sources(batch, batch.visual_tokens)
    hidden, _ = backbone_hidden_states(
        m.backbone, batch, batch.visual_tokens, source_inputs=m.source_inputs(sources)
    )
    rows, cols = batch.visual_positions[:, 0], batch.visual_positions[:, 1]
    return m.predict_visual_tokens(hidden[rows, cols], sources).float(), enc


@torch.no_grad()
def picture_tokens(
    pipe: OrionPipeline, pictures: Sequence[Image.Image], *, batch_size: int = 32
) -> list[torch.Tensor]:
    """The frozen tower's tokens of each picture ([n, d] each), batched: what the decoder renders back
    (the decoder's ceilings: ``benchmarks/gen_ceiling.py``, ``benchmarks/edit_ceiling.py``)."""
    m = pipe.model
    out: list[torch.Tensor] = []
    for start in range(0, len(pictures), batch_size):
        chunk = list(pictures[start : start + batch_size])
        inputs = m.processor.image_processor(images=chunk, return_tensors="pt")
        flat = m.encode_images(inputs["pixel_values"], inputs["image_grid_thw"]).float()
        out.extend(flat.view(len(chunk), -1, flat.shape[-1]))
    return out


def render_tokens(
    pipe: OrionPipeline, tokens: Sequence[torch.Tensor], *, batch_size: int = 32, seed: int = 0
) -> list[Image.Image]:
    """Decoder renderings, batched; image ``i``'s noise is drawn from ``seed + i`` alone, so the images
    do not depend on ``batch_size`` (and ``orion eval geneval`` renders the same ones)."""
    images: list[Image.Image] = []
    for start in range(0, len(tokens), batch_size):
        chunk = list(tokens[start : start + batch_size])
        with torch.no_grad():
            images.extend(pipe.render(chunk, seeds=[seed + start + i for i in range(len(chunk))]))
    return images


def generate_images(
    pipe: OrionPipeline, requests: Sequence[str], *, sources: Sequence[Image.Image] | None = None,
    batch_size: int = 32, seed: int = 0, progress: bool = True, desc: str = "generating",
    guidance: float | None = None,
) -> list[Image.Image]:  # fmt: skip
    """One image per request (an edit of ``sources[k]`` when given): regress tokens, then render."""
    tokens = regress_tokens(
        pipe, requests, sources=sources, batch_size=batch_size, seed=seed, progress=progress, desc=desc,
        guidance=guidance,
    )  # fmt: skip
    return render_tokens(pipe, tokens, batch_size=batch_size, seed=seed)


@dataclass(frozen=True)
class TrainingCaptions:
    """The text-to-image captions a ShapesWorld folder trains on, and the hold-out it was written with
    (``write_shapes_dataset(holdout=...)``), so a prompt can be told seen or unseen, and why."""

    captions: frozenset[str]
    holdout: str

    def seen(self, spec: Spec) -> bool:
        return canonical_caption(spec) in self.captions

    def unseen_reason(self, spec: Spec) -> str:
        """Why an unseen prompt's caption is absent (:meth:`Holdout.unseen_reason`)."""
        return Holdout.named(self.holdout).unseen_reason(spec)

    def unseen_by_reason(self, judged: Iterable[tuple[Spec, bool]]) -> dict[str, dict[str, float]]:
        """Unseen prompts per reason: how many, and the share drawn right (``judged``: spec, right)."""
        hits: dict[str, list[bool]] = {}
        for spec, right in judged:
            if not self.seen(spec):
                hits.setdefault(self.unseen_reason(spec), []).append(right)
        return {r: {"prompts": len(h), "accuracy": sum(h) / len(h)} for r, h in sorted(hits.items())}


def training_captions(gen_jsonl: str | Path) -> TrainingCaptions:
    """The captions a ShapesWorld generation file trains on (its records' ``caption`` field), with the
    hold-out its folder's ``meta.json`` records (folders from before hold-outs were a setting: ``pairs``)."""
    gen_jsonl = Path(gen_jsonl)
    meta_file = gen_jsonl.parent / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: no ShapesWorld meta.json beside {gen_jsonl.name}")
    settings = recorded_settings(json.loads(meta_file.read_text())) or {}
    captions = frozenset(r["caption"] for r in read_jsonl(gen_jsonl) if "caption" in r)
    return TrainingCaptions(captions, settings.get("holdout", "pairs"))


def eval_generation(
    pipe: OrionPipeline, outdir: str | Path, *, prompts: Sequence[GenPrompt] | None = None,
    batch_size: int = 32, seed: int = 0, progress: bool = True, guidance: float | None = None,
    training: TrainingCaptions | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``shapes-gen``: one image per prompt written in GenEval's layout under ``outdir``, then scored.

    With ``training`` (:func:`training_captions`) the prompts are also split by whether their caption
    occurs verbatim in training: ``seen`` / ``unseen`` counts and ``unseen_scores`` (the same scorer on
    the unseen prompts alone: per category and their mean, GenEval's ``overall``), so drawing can be
    told apart from recalling; ``unseen_by_reason`` splits them by why they are unseen
    (:meth:`TrainingCaptions.unseen_reason`: prompts and share drawn right)."""
    outdir = Path(outdir)
    prompts = list(prompts if prompts is not None else prompt_set())
    images = generate_images(
        pipe, [p.prompt for p in prompts], batch_size=batch_size, seed=seed, progress=progress,
        desc="shapes-gen", guidance=guidance,
    )  # fmt: skip
    for p, image in zip(prompts, images, strict=True):
        folder = outdir / f"{p.index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(p.metadata(), sort_keys=True) + "\n")
        image.save(folder / "samples" / "0000.png")
    scores: dict[str, Any] = dict(score_folder(outdir, progress=progress))
    if training is not None:
        unseen = [(p.spec, judge(p.spec, im)) for p, im in zip(prompts, images, strict=True)
                  if not training.seen(p.spec)]  # fmt: skip
        scores["seen"] = len(prompts) - len(unseen)
        scores["unseen"] = len(unseen)
        unseen_scores = score_judgments(unseen) if unseen else {}
        unseen_scores.pop("n", None)
        scores["unseen_scores"] = unseen_scores
        scores["unseen_by_reason"] = training.unseen_by_reason(unseen)
    return scores


def eval_editing(
    pipe: OrionPipeline, records: Sequence[dict[str, Any]], root: str | Path, *, batch_size: int = 32,
    seed: int = 0, progress: bool = True, save_dir: str | Path | None = None, guidance: float | None = None,
) -> dict[str, float]:  # fmt: skip
    """``shapes-edit`` accuracy per operation and ``overall``; edited images saved to ``save_dir``."""
    root = Path(root)
    sources = [load_image(root / r["images"][0]) for r in records]
    edited = generate_images(
        pipe, [r["instruction"] for r in records], sources=sources, batch_size=batch_size, seed=seed,
        progress=progress, desc="shapes-edit", guidance=guidance,
    )  # fmt: skip
    by_source = {root / r["images"][0]: im for r, im in zip(records, edited, strict=True)}
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        for r, im in zip(records, edited, strict=True):
            im.save(save_dir / f"{r['id']}.png")
    edit_fn: Callable[[Path, str], Image.Image] = lambda source, instruction: by_source[source]  # noqa: E731
    return score_edits(records, root, edit_fn)


def _answers_about_drawings(
    pipe: OrionPipeline, records: Sequence[dict[str, Any]], tokens: Sequence[torch.Tensor], batch_size: int
) -> list[str]:
    """Each record's question asked with ``tokens[k]`` in context as the model's own drawing."""
    sampling = SamplingConfig(max_new_tokens=16, allow_images=False)
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        asks = []
        for r, t in zip(records[start : start + batch_size], tokens[start : start + batch_size], strict=True):
            s = ChatSession()
            s.add("user", [r["conversations"][0]["value"]])
            s.add("assistant", [GeneratedImage(t)])
            s.add("user", [r["conversations"][2]["value"]])
            asks.append(pipe.prompt(s))
        with torch.no_grad():
            outs = pipe.engine.generate(asks, sampling)
        answers.extend(pipe.reply_from(o).text.strip() for o in outs)
    return answers


def eval_interleaved(
    pipe: OrionPipeline, records: Sequence[dict[str, Any]], *, batch_size: int = 32, progress: bool = True,
    guidance: float | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:  # fmt: skip
    """Generate-then-ask dialogues (``interleaved.jsonl``): the model draws the prompt's image, then is
    asked about it with its own predicted tokens in context (paper 4.3). These dialogues name what
    they ask for; the ShapesWorld recipes train only draw-then-ask dialogues whose request names
    nothing (``draw_ask.jsonl``), on other scenes. Returns the answer accuracy and, per record, what
    was said.

    The control ``overall_swapped`` asks the same questions with each drawing replaced by the next
    dialogue's: if the answers come from the picture, accuracy drops; if they come from the prompt's
    words (which stay in context), it does not."""
    prompts = [r["conversations"][0]["value"] for r in records]
    tokens = regress_tokens(
        pipe, prompts, batch_size=batch_size, progress=progress, desc="interleaved", guidance=guidance
    )
    answers = _answers_about_drawings(pipe, records, tokens, batch_size)
    swapped = list(tokens[1:]) + list(tokens[:1])
    swapped_answers = _answers_about_drawings(pipe, records, swapped, batch_size)
    dialogues = [
        {"id": r["id"], "prompt": r["conversations"][0]["value"], "question": r["conversations"][2]["value"],
         "answer": a, "gold": r["answer"], "right": normalise(a) == normalise(r["answer"]),
         "answer_swapped": sa, "right_swapped": normalise(sa) == normalise(r["answer"]), "tokens": t}
        for r, a, sa, t in zip(records, answers, swapped_answers, tokens, strict=True)
    ]  # fmt: skip
    n = len(dialogues)
    accuracy = sum(d["right"] for d in dialogues) / n if n else 0.0
    accuracy_swapped = sum(d["right_swapped"] for d in dialogues) / n if n else 0.0
    return {"overall": accuracy, "overall_swapped": accuracy_swapped, "dialogues": n}, dialogues


__all__ = [
    "EVAL_SEED",
    "TrainingCaptions",
    "answer_many",
    "eval_editing",
    "eval_generation",
    "eval_interleaved",
    "eval_set",
    "eval_understanding",
    "generate_images",
    "picture_tokens",
    "read_jsonl",
    "regress_tokens",
    "render_tokens",
    "session_from_turns",
    "teacher_forced_tokens",
    "training_captions",
]
