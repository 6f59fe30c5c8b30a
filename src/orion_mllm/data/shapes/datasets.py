"""ShapesWorld datasets: understanding, text-to-image, editing and interleaved conversations on disk.

``write_shapes_dataset`` renders scenes and writes conversation JSONL (LLaVA form: ``conversations``
with ``from``/``value`` and ``<image>`` placeholders; image paths relative to the JSONL's folder)
plus PNGs, the same format real data uses, so the training pipeline reads them unchanged. Every
record also keeps what generated it (``scene``, ``spec``, ``answer``...) so evaluations can score it.

Files written under ``out``:

- ``und.jsonl``: captions, MMBench-style multiple choice (A-D), short answers about colour, shape,
  count, existence and relative position, and multi-turn dialogues about one image;
- ``gen.jsonl``: captions in GenEval's six categories wrapped in the prompt templates
  (``orion_mllm.data.templates``). With ``gen_layout="canonical"`` (the default) the caption fixes the
  picture: what it leaves open gets a fixed value (each shape's default colour, a size by object
  count, positions on fixed slots that satisfy the relation). ORION regresses visual tokens with an
  MSE loss, which learns the mean of all pictures a caption allows; over random layouts that mean is
  a blur no decoder can render, so text-to-image targets must be a function of the text (diversity
  comes from elaborated prompts, paper appendix A.1). ``gen_layout="random"`` samples free layouts
  (the decoder's training images);
- ``edit.jsonl``: recolour / add / remove / move / swap, source image in the user turn, target in
  the assistant turn;
- ``draw_ask.jsonl``: draw-then-ask training dialogues, one per ``gen.jsonl`` record and on its
  picture: a request that names nothing ("Draw some shapes.", ``VAGUE_REQUESTS``), the picture as the
  assistant's image, then "How many <shape>s are there?" about a shape in it or one absent from it.
  The answer is only in the picture, so a model trained on them answers about its own drawing from the
  drawing (the interleaved evaluation's swapped-drawing control), not from the request's words;
- ``interleaved.jsonl``: evaluation dialogues that generate an image, then ask about it;
- ``heldout_gen.jsonl``: text-to-image prompts training never sees (``holdout``, :class:`Holdout`):
  held-out captions in their canonical pictures (default), or the held-out colour-shape pairs and
  count (``holdout="pairs"``);
- ``meta.json``: seed, size, counts, vocabulary, the hold-out, and ``settings``: the arguments it
  was written with (a recipe's ``shapes_data``; ``recorded_settings`` reads them back, so a run can
  tell whether a folder holds the data it asks for).

Deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from orion_mllm.data.shapes.render import render_scene
from orion_mllm.data.shapes.scorer import CATEGORIES, ObjectSpec, Spec, sample_spec_and_scene
from orion_mllm.data.shapes.world import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    fits_in_scene,
    relation_holds,
    sample_scene,
)
from orion_mllm.data.templates import ALL_TEMPLATES, generation_prompt

HOLDOUTS = ("captions", "pairs")
# The order a caption lists a scene's objects in (``caption_order``). "scene": the order they were
# placed in, i.e. random: the next object of a caption cannot be predicted, and that irreducible loss
# drowned the short answers in stage 0. "shape" / "colour": sorted by shape (then colour, size) or by
# colour (then shape, size), a convention the model can learn. Each order also trains one lookup: in
# shape order the next shape is known and its colour must be found (what "What colour is the
# circle?" asks); in colour order the reverse (what "What shape is the blue object?" asks). "split"
# trains both: shape order when the request asks for the shapes ("Describe the shapes you see."),
# colour order for the other requests (benchmarks/SMALL_SCALE.md, session 11).
CAPTION_ORDERS = ("scene", "shape", "colour", "split")
SHAPES_REQUEST = "Describe the shapes you see."  # the caption request "split" answers in shape order
CAPTION_PROMPTS = ("Describe the image.", "What is in this picture?", SHAPES_REQUEST)
CAPTION_HOLDOUT_MODULUS = 5  # about one caption in five is held out (``is_held_out_caption``)
# How ``und.jsonl`` puts its first question (``question_first``) and answers multiple choice
# (``mcq_answer``). In a causal LLM the picture's tokens cannot see a question written after them, so
# "What colour is the circle?" is answered by one retrieval from the answer position; with the question
# first every visual token can attend to it (benchmarks/SMALL_SCALE.md, sessions 15-16: drawing and
# understanding better over two stage-0 runs). A "reasoned" multiple-choice answer names the colour
# before the letter ("The star is red, so B."), so the letter is a copy from the options next to the
# colour word just written; ``shapes_und_edit.mcq_letter`` still reads the letter.
MCQ_ANSWERS = ("letter", "reasoned")
IMAGE_TAG = "<image>"


def is_held_out_caption(caption: str) -> bool:
    """Whether a text-to-image caption is kept out of training under the ``captions`` hold-out.

    A fixed rule on the caption's text (its SHA-256 modulo 5, case and a final full stop aside), so it
    needs no list, holds out about a fifth of all captions whatever prompt set is evaluated (per
    category it varies: 2 of the 6 single-object captions), and the same caption is held out on every
    machine and in every version. Every colour-shape pair and count still occurs in training (in other
    captions and in every other task): a held-out caption asks for a new combination of trained words,
    the generalisation issue 16 measures. Its canonical picture may still be a training target under
    another caption ("a star" is drawn as "a yellow star" is): what is held out is the text."""
    digest = hashlib.sha256(caption.strip().rstrip(".").lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") % CAPTION_HOLDOUT_MODULUS == 0


@dataclass(frozen=True)
class Holdout:
    """What ShapesWorld keeps out of its training files (``write_shapes_dataset(holdout=...)``).

    ``captions`` (the default): the text-to-image captions :func:`is_held_out_caption` picks never
    occur in ``gen.jsonl``; every image, pair and count trains. ``pairs`` (the design until session 7
    of issue 16): three colour-shape pairs and four-of-a-shape occur in no training image, caption,
    question or answer option at all, a zero-shot test the tiny models never passed (0 of 54 prompts)."""

    name: str
    pairs: tuple[tuple[str, str], ...] = ()
    max_count: int = 4  # the most objects of one shape a training image holds

    @classmethod
    def named(cls, name: str) -> Holdout:
        if name == "captions":
            return cls("captions")
        if name == "pairs":
            return cls("pairs", pairs=HELD_OUT_PAIRS, max_count=HELD_OUT_COUNT - 1)
        raise ValueError(f"holdout={name!r}: choose one of {', '.join(HOLDOUTS)}")

    def pair_ok(self, colour: str, shape: str) -> bool:
        return (colour, shape) not in self.pairs

    def scene_ok(self, scene: Scene) -> bool:
        shapes = [o.shape for o in scene.objects]
        return all(self.pair_ok(o.colour, o.shape) for o in scene.objects) and all(
            shapes.count(s) <= self.max_count for s in shapes
        )

    def unseen_reason(self, spec: Spec) -> str:
        """Why a prompt absent from training is absent. Under ``captions``: the rule keeps its caption
        out (``held_out_caption``) or the sampler never drew it (``new_combination``). Under ``pairs``:
        it names a colour-shape pair no training image holds (``heldout_pair``), a count no training
        image holds (``heldout_count``: extrapolation), or a new combination of trained ones."""
        if self.name == "captions":
            return "held_out_caption" if is_held_out_caption(canonical_caption(spec)) else "new_combination"
        if any(not self.pair_ok(o.colour or "", o.shape) for o in spec.objects):
            return "heldout_pair"
        if any(o.count > self.max_count for o in spec.objects):
            return "heldout_count"
        return "new_combination"

    def spec_ok(self, spec: Spec, caption: str) -> bool:
        """May a text-to-image record with this spec and caption be in training. A free layout's
        caption names colours its spec leaves open ("a yellow star" for "a star"): both are checked,
        so a held-out prompt never trains under its filled-in wording either."""
        if self.name == "captions":
            return not (is_held_out_caption(caption) or is_held_out_caption(canonical_caption(spec)))
        return all(o.count <= self.max_count for o in spec.objects)


# The ``pairs`` hold-out: never in its training captions, questions or images; only in heldout_gen.jsonl.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("purple", "star"), ("orange", "cross"), ("pink", "triangle"))
HELD_OUT_COUNT = 4  # under ``pairs``, counting captions and count questions in training use 1-3 only

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
QUESTION_TYPES = ("colour", "shape", "count", "existence", "position")
EDIT_OPS = ("recolour", "add", "remove", "move", "swap")
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ss")) or shape == "cross" else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _resample(rng: random.Random, draw: Callable[[], Any], accept: Callable[[Any], bool], what: str) -> Any:
    for _ in range(1000):
        value = draw()
        if accept(value):
            return value
    raise RuntimeError(f"could not sample a {what} the hold-out allows in 1000 draws")


def object_phrase(obj: ShapeObject, *, size: bool = False) -> str:
    words = ([obj.size] if size else []) + [obj.colour, obj.shape]
    return f"{article(words[0])} {' '.join(words)}"


def _by_shape(o: ShapeObject) -> tuple[int, int, int]:
    return SHAPES.index(o.shape), list(COLOURS).index(o.colour), list(SIZES).index(o.size)


def _by_colour(o: ShapeObject) -> tuple[int, int, int]:
    return list(COLOURS).index(o.colour), SHAPES.index(o.shape), list(SIZES).index(o.size)


def check_caption_order(order: str) -> None:
    if order not in CAPTION_ORDERS:
        raise ValueError(f"caption_order={order!r}: choose one of {', '.join(CAPTION_ORDERS)}")


def caption_objects(scene: Scene, order: str = "scene", prompt: str = "") -> tuple[ShapeObject, ...]:
    """The scene's objects in the order a caption lists them (``CAPTION_ORDERS``; ``prompt``: the
    request, or the user turn ending with it, which ``split`` reads)."""
    check_caption_order(order)
    if order == "scene":
        return scene.objects
    by_shape = order == "shape" or (order == "split" and prompt.endswith(SHAPES_REQUEST))
    return tuple(sorted(scene.objects, key=_by_shape if by_shape else _by_colour))


def describe_scene(scene: Scene, order: str = "scene", prompt: str = "") -> str:
    """One sentence naming every object with its size, plus the relation when there are two (objects in
    :func:`caption_objects`' order)."""
    scene = Scene(caption_objects(scene, order, prompt))
    phrases = [object_phrase(o, size=True) for o in scene.objects]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    text = text[0].upper() + text[1:] + "."
    if len(scene.objects) == 2:
        a, b = scene.objects
        rel = clear_relation(a, b)
        if rel is not None and (a.colour, a.shape) != (b.colour, b.shape):
            text += f" The {a.colour} {a.shape} is {rel} the {b.colour} {b.shape}."
    return text


def clear_relation(a: ShapeObject, b: ShapeObject) -> str | None:
    """The relation of a to b when it is unambiguous (one axis clearly dominates), else None."""
    rel = horizontal_or_vertical(a, b)
    return rel if relation_holds(a, b, rel) else None


def horizontal_or_vertical(a: ShapeObject, b: ShapeObject) -> str:
    """The dominant relation of a to b (the axis with the larger centre offset)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def caption_for(spec: Spec, scene: Scene) -> str:
    """The GenEval-category caption of ``spec``, colours filled in where the scene makes them unambiguous."""
    filled = []
    for o in spec.objects:
        colours = {x.colour for x in scene.objects if x.shape == o.shape}
        colour = o.colour or (colours.pop() if len(colours) == 1 else None)
        filled.append(ObjectSpec(o.shape, colour, o.count))
    return Spec(spec.category, filled, spec.relation).prompt().removeprefix("a photo of ")


# ----------------------------------------------------------------------------- understanding


def _unique(scene: Scene, key: Callable[[ShapeObject], Any]) -> list[ShapeObject]:
    values = [key(o) for o in scene.objects]
    return [o for o in scene.objects if values.count(key(o)) == 1]


def short_question(rng: random.Random, scene: Scene, qtype: str, holdout: Holdout) -> tuple[str, str] | None:
    """(question, answer) of ``qtype`` about ``scene``, or None when the scene cannot support it."""
    if qtype == "colour":
        cands = _unique(scene, lambda o: o.shape)
        if not cands:
            return None
        o = rng.choice(cands)
        return f"What colour is the {o.shape}?", o.colour.capitalize() + "."
    if qtype == "shape":
        cands = _unique(scene, lambda o: o.colour)
        if not cands:
            return None
        o = rng.choice(cands)
        return f"What shape is the {o.colour} object?", f"{article(o.shape).capitalize()} {o.shape}."
    if qtype == "count":
        shape = rng.choice([o.shape for o in scene.objects] + [rng.choice(SHAPES)])
        n = sum(o.shape == shape for o in scene.objects)
        return f"How many {plural(shape)} are there?", str(n)
    if qtype == "existence":
        if rng.random() < 0.5:
            o = rng.choice(scene.objects)
            colour, shape = o.colour, o.shape
        else:
            present = {(o.colour, o.shape) for o in scene.objects}
            colour, shape = _resample(
                rng,
                lambda: (rng.choice(list(COLOURS)), rng.choice(SHAPES)),
                lambda p: p not in present and holdout.pair_ok(*p),
                "absent pair",
            )
        answer = "Yes." if any((o.colour, o.shape) == (colour, shape) for o in scene.objects) else "No."
        return f"Is there {article(colour)} {colour} {shape} in the image?", answer
    if qtype == "position":
        cands = _unique(scene, lambda o: (o.colour, o.shape))
        if len(cands) < 2:
            return None
        a, b = rng.sample(cands, 2)
        rel = clear_relation(a, b)
        if rel is None:  # diagonal neighbours: "left of" and "above" would both be right
            return None
        return (
            f"Where is the {a.colour} {a.shape} relative to the {b.colour} {b.shape}? "
            "Answer left of, right of, above or below.",
            rel.capitalize() + ".",
        )
    raise ValueError(f"unknown question type {qtype!r}")


def multiple_choice(rng: random.Random, scene: Scene, holdout: Holdout) -> tuple[str, list[str], str] | None:
    """MMBench-style colour question: (question, four options, correct letter)."""
    cands = _unique(scene, lambda o: o.shape)
    if not cands:
        return None
    o = rng.choice(cands)
    # Under the pairs hold-out, distractors never pair a held-out colour with this shape, not even as a
    # wrong option.
    distractors = [c for c in COLOURS if c != o.colour and holdout.pair_ok(c, o.shape)]
    options = [o.colour, *rng.sample(distractors, 3)]
    rng.shuffle(options)
    return f"What colour is the {o.shape}?", options, "ABCD"[options.index(o.colour)]


def ask_about_image(question: str, question_first: bool = False) -> str:
    """A first human turn about the record's picture: ``<image>\nQ`` (LLaVA's order, the default) or,
    with ``question_first``, ``Q\n<image>``."""
    return f"{question}\n{IMAGE_TAG}" if question_first else f"{IMAGE_TAG}\n{question}"


def question_of(turn: str) -> str:
    """The text of a first human turn without its picture, in either order (:func:`ask_about_image`)."""
    return turn.removeprefix(f"{IMAGE_TAG}\n").removesuffix(f"\n{IMAGE_TAG}")


def mcq_answer_text(shape: str, colour: str, letter: str, style: str = "letter") -> str:
    """The assistant's answer to a multiple-choice colour question (``MCQ_ANSWERS``): the letter alone,
    or ``reasoned``: "The star is red, so B." (the colour word is the very token the options hold)."""
    if style == "reasoned":
        return f"The {shape} is {colour}, so {letter}."
    if style != "letter":
        raise ValueError(f"mcq_answer={style!r}: choose {' or '.join(map(repr, MCQ_ANSWERS))}")
    return letter


def format_mcq(question: str, options: list[str]) -> str:
    lines = [question, *(f"{letter}. {opt}" for letter, opt in zip("ABCD", options, strict=True)), MCQ_SUFFIX]
    return "\n".join(lines)


def understanding_record(
    rng: random.Random, scene: Scene, image: str, index: int, holdout: Holdout, caption_order: str = "scene",
    question_first: bool = False, mcq_answer: str = "letter",
) -> dict[str, Any]:  # fmt: skip
    kind = rng.choice(("caption", "mcq", "short", "short", "dialogue"))
    base = {"id": f"und-{index:06d}", "task": "understanding", "image": image, "scene": scene.to_dict()}
    if kind == "caption":
        prompt = rng.choice(CAPTION_PROMPTS)
        caption = describe_scene(scene, caption_order, prompt)
        return {
            **base,
            "qtype": "caption",
            "answer": caption,
            "conversations": [
                {"from": "human", "value": ask_about_image(prompt, question_first)},
                {"from": "gpt", "value": caption},
            ],
        }
    if kind == "mcq" and (mcq := multiple_choice(rng, scene, holdout)) is not None:
        question, options, letter = mcq
        shape = question.removeprefix("What colour is the ").removesuffix("?")
        answer = mcq_answer_text(shape, options["ABCD".index(letter)], letter, mcq_answer)
        return {
            **base,
            "qtype": "mcq",
            "options": options,
            "answer": letter,
            "conversations": [
                {"from": "human", "value": ask_about_image(format_mcq(question, options), question_first)},
                {"from": "gpt", "value": answer},
            ],
        }
    turns = 1 if kind != "dialogue" else rng.randint(2, 3)
    conversations, qtypes, answers = [], [], []
    for t in range(turns):
        for _ in range(20):
            qtype = rng.choice(QUESTION_TYPES)
            qa = short_question(rng, scene, qtype, holdout)
            if qa is not None and all(qa[0] not in turn["value"] for turn in conversations[::2]):
                break
        else:  # every scene supports count questions (repeats are rare and harmless here)
            qtype, qa = "count", short_question(rng, scene, "count", holdout)
        question, answer = qa
        conversations += [
            {"from": "human", "value": ask_about_image(question, question_first) if t == 0 else question},
            {"from": "gpt", "value": answer},
        ]
        qtypes.append(qtype)
        answers.append(answer)
    return {
        **base,
        "qtype": qtypes[0] if turns == 1 else "dialogue",
        "qtypes": qtypes,
        "answer": answers[0],
        "answers": answers,
        "conversations": conversations,
    }


# ----------------------------------------------------------------------------- editing


def _refer(o: ShapeObject) -> str:
    return f"the {o.colour} {o.shape}"


def _fits_all(objs: list[ShapeObject]) -> bool:
    return all(fits_in_scene(o, objs[:k] + objs[k + 1 :]) for k, o in enumerate(objs))


# Where ``add_layout="canonical"`` puts an added object: the first of these places where a small one
# fits beside the source's objects: the centre, then a 7 x 7 grid row by row from the top left (a free
# place exists for 396 of 400 tiny add edits: benchmarks/add_slots.py).
_ADD_GRID = (0.17, 0.28, 0.39, 0.5, 0.61, 0.72, 0.83)
_ADD_SLOTS = ((0.5, 0.5), *((x, y) for y in _ADD_GRID for x in _ADD_GRID))
ADD_LAYOUTS = ("canonical", "random")


def canonical_addition(source: Scene, shape: str, colour: str) -> ShapeObject | None:
    """The one picture "Add a <colour> <shape>." stands for: a small object on the first free slot of
    ``_ADD_SLOTS``, or None when none is free.

    An MSE-regressed edit learns the mean of every target its request allows; with the new object at a
    random place and size that mean is a faint smear (issue 16: add stayed at 0 after 77,000 edit
    samples), so, as for text-to-image's canonical layouts, the target is made a function of the source
    and the words."""
    for x, y in _ADD_SLOTS:
        obj = ShapeObject(shape, colour, "small", x, y)
        if fits_in_scene(obj, source.objects):
            return obj
    return None


def edit_pair(
    rng: random.Random, op: str, holdout: Holdout, add_layout: str = "random"
) -> tuple[Scene, Scene, str] | None:
    """(source, target, instruction) for one edit operation, or None if this draw does not allow it.

    ``add_layout``: where "add" puts the new object: at random (``random``, what older folders hold) or
    on :func:`canonical_addition`'s slot (``canonical``; where no slot is free, ~1% of adds, the random
    place stays). The same random draws are made either way, so every other record is unchanged."""
    source = sample_scene(rng, rng.randint(1 if op in ("recolour", "add", "move") else 2, 3))
    if not holdout.scene_ok(source):
        return None
    objs = list(source.objects)
    unique = _unique(source, lambda o: (o.colour, o.shape))
    if op == "add":
        if len(objs) >= 4:
            return None
        try:
            target = sample_scene(rng, len(objs) + 1, fixed=[o.to_dict() for o in objs], max_tries=20)
        except RuntimeError:  # no room left for another object in this scene
            return None
        new = target.objects[-1]
        placed = canonical_addition(source, new.shape, new.colour) if add_layout == "canonical" else None
        if placed is not None:  # (no free slot, ~1%: the random place drawn above stays)
            target = Scene((*objs, placed))
        instruction = f"Add {object_phrase(new)}."
    elif not unique:
        return None
    elif op == "recolour":
        o = rng.choice(unique)
        colour = rng.choice([c for c in COLOURS if c != o.colour and holdout.pair_ok(c, o.shape)])
        new_objs = [ShapeObject(x.shape, colour, x.size, x.x, x.y) if x is o else x for x in objs]
        target, instruction = Scene(tuple(new_objs)), f"Change the colour of {_refer(o)} to {colour}."
    elif op == "remove":
        o = rng.choice(unique)
        target, instruction = Scene(tuple(x for x in objs if x is not o)), f"Remove {_refer(o)}."
    elif op == "move":
        o = rng.choice(unique)
        direction = rng.choice(("left", "right", "top", "bottom"))
        half_w, half_h = o.half_extent
        coord = round(
            {
                "left": 0.05 + half_w + 0.01,
                "right": 0.95 - half_w - 0.01,
                "top": 0.05 + half_h + 0.01,
                "bottom": 0.95 - half_h - 0.01,
            }[direction],
            4,
        )
        moved = ShapeObject(
            o.shape,
            o.colour,
            o.size,
            coord if direction in ("left", "right") else o.x,
            coord if direction in ("top", "bottom") else o.y,
        )
        if abs(moved.x - o.x) + abs(moved.y - o.y) < 0.15:
            return None
        new_objs = [moved if x is o else x for x in objs]
        if not _fits_all(new_objs):
            return None
        target, instruction = Scene(tuple(new_objs)), f"Move {_refer(o)} to the {direction}."
    elif op == "swap":
        if len(unique) < 2:
            return None
        a, b = rng.sample(unique, 2)
        pos = {id(a): (b.x, b.y), id(b): (a.x, a.y)}
        new_objs = [ShapeObject(x.shape, x.colour, x.size, *pos[id(x)]) if id(x) in pos else x for x in objs]
        if not _fits_all(new_objs):
            return None
        target, instruction = Scene(tuple(new_objs)), f"Swap the positions of {_refer(a)} and {_refer(b)}."
    else:
        raise ValueError(f"unknown edit op {op!r}")
    return source, target, instruction


# ----------------------------------------------------------------------------- writer


@dataclass
class _Writer:
    out: Path
    size: int

    def image(self, scene: Scene, rel: str) -> str:
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        render_scene(scene, self.size).save(path, format="PNG", optimize=False)
        return rel


# Draw-then-ask requests that name nothing: the question's answer is then only in the picture.
VAGUE_REQUESTS = (
    "Draw a picture.",
    "Draw some shapes.",
    "Draw a picture with a few shapes.",
    "Make a picture of some shapes.",
    "Draw whatever shapes you like.",
    "Show me a picture of shapes.",
)


def draw_ask_record(rng: random.Random, gen_record: dict[str, Any]) -> dict[str, Any]:
    """A draw-then-ask dialogue on a text-to-image record's picture: a vague request, the picture, then
    how many of a shape it holds (half the time a shape it holds, else one it does not: answer 0, as
    the evaluation's dialogues also ask about shapes the drawing should not hold)."""
    present = [o["shape"] for o in gen_record["scene"]["objects"]]
    absent = [s for s in SHAPES if s not in present]
    shape = rng.choice(sorted(set(present))) if rng.random() < 0.5 or not absent else rng.choice(absent)
    answer = str(present.count(shape))
    return {
        "id": gen_record["id"].replace("gen-", "drawask-"),
        "task": "interleaved",
        "image": gen_record["image"],
        "scene": gen_record["scene"],
        "answer": answer,
        "conversations": [
            {"from": "human", "value": rng.choice(VAGUE_REQUESTS)},
            {"from": "gpt", "value": "<image>"},
            {"from": "human", "value": f"How many {plural(shape)} are there?"},
            {"from": "gpt", "value": answer},
        ],
    }


def _jsonl(path: Path, records: Iterator[dict[str, Any]]) -> int:
    n = 0
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            n += 1
    tmp.replace(path)  # a killed run never leaves a truncated file under the final name
    return n


def _generation_record(
    rng: random.Random, w: _Writer, split: str, i: int, spec: Spec, scene: Scene, *, fill_colours: bool = True
) -> dict[str, Any]:
    """A text-to-image record: templated prompt in the user turn, the rendered scene as the target.
    ``fill_colours``: name colours the scene makes unambiguous (random layouts); canonical layouts keep
    the caption as the spec says it (an unnamed colour is the shape's default)."""
    caption = caption_for(spec, scene) if fill_colours else canonical_caption(spec)
    return {
        "id": f"{split}-{i:06d}",
        "task": "generation",
        "category": spec.category,
        "caption": caption,
        "spec": spec.to_dict(),
        "scene": scene.to_dict(),
        "image": w.image(scene, f"images/{split}/{i:06d}.png"),
        "conversations": [
            {"from": "human", "value": generation_prompt(caption, rng)},
            {"from": "gpt", "value": "<image>"},
        ],
    }


# Canonical text-to-image layouts (see the module docstring). Default colours avoid the pairs hold-out.
DEFAULT_COLOUR = {"circle": "red", "square": "blue", "triangle": "green", "star": "yellow", "cross": "black",
                  "diamond": "orange"}  # fmt: skip
_SLOTS = {
    1: [(0.5, 0.5)],
    2: [(0.28, 0.5), (0.72, 0.5)],
    3: [(0.25, 0.3), (0.75, 0.3), (0.5, 0.72)],
    4: [(0.28, 0.28), (0.72, 0.28), (0.28, 0.72), (0.72, 0.72)],
}
_RELATION_SLOTS = {  # (first object, second object) for "first <relation> second"
    "left of": [(0.28, 0.5), (0.72, 0.5)],
    "right of": [(0.72, 0.5), (0.28, 0.5)],
    "above": [(0.5, 0.28), (0.5, 0.72)],
    "below": [(0.5, 0.72), (0.5, 0.28)],
}


def canonical_scene(spec: Spec) -> Scene:
    """The one picture a generation caption stands for: unspecified colours are each shape's default,
    one object is medium and centred, several are small on fixed slots in caption order."""
    objects = [(o.shape, o.colour or DEFAULT_COLOUR[o.shape]) for o in spec.objects for _ in range(o.count)]
    if spec.relation is not None:
        a, _, b = spec.relation
        slots = _RELATION_SLOTS[spec.relation[1]]
        order = [a, b]
        placed = [None, None]
        for k, idx in enumerate(order):
            placed[idx] = slots[k]
        slots = placed
    elif len(objects) in _SLOTS:
        slots = _SLOTS[len(objects)]
    else:
        raise ValueError(f"no canonical layout for {len(objects)} objects (spec {spec.to_dict()})")
    size = "medium" if len(objects) == 1 else "small"
    scene = Scene(
        [
            ShapeObject(shape, colour, size, x, y)
            for (shape, colour), (x, y) in zip(objects, slots, strict=True)
        ]
    )
    for k, obj in enumerate(scene.objects):
        if not fits_in_scene(obj, scene.objects[:k]):
            raise AssertionError(f"canonical layout does not fit: {scene.to_dict()}")
    return scene


def canonical_caption(spec: Spec) -> str:
    """A canonical-layout record's caption: the spec's words as GenEval's prompt has them."""
    return spec.prompt().removeprefix("a photo of ")


def _canonical_spec_and_scene(rng: random.Random, category: str, holdout: Holdout) -> tuple[Spec, Scene]:
    """A training caption's spec (no counting distractors: the caption would not mention them) and
    its canonical scene."""

    def draw() -> tuple[Spec, Scene]:
        spec, _ = sample_spec_and_scene(rng, category)
        return spec, canonical_scene(spec)

    return _resample(
        rng, draw,
        lambda pair: holdout.scene_ok(pair[1]) and holdout.spec_ok(pair[0], canonical_caption(pair[0])),
        f"canonical {category} scene",
    )  # fmt: skip


def _gen_spec_and_scene(rng: random.Random, category: str, holdout: Holdout) -> tuple[Spec, Scene]:
    return _resample(
        rng,
        lambda: sample_spec_and_scene(rng, category),
        lambda pair: holdout.scene_ok(pair[1]) and holdout.spec_ok(pair[0], caption_for(*pair)),
        f"{category} scene",
    )


def _held_out_spec_and_scene(rng: random.Random, category: str) -> tuple[Spec, Scene]:
    """A canonical text-to-image pair whose caption the ``captions`` hold-out keeps out of training."""

    def draw() -> tuple[Spec, Scene]:
        spec, _ = sample_spec_and_scene(rng, category)
        return spec, canonical_scene(spec)

    def held_out(pair: tuple[Spec, Scene]) -> bool:
        return is_held_out_caption(canonical_caption(pair[0]))

    return _resample(rng, draw, held_out, "held-out caption")


SETTINGS = (
    "size", "n_und", "n_gen", "n_edit", "n_interleaved", "n_heldout", "seed", "gen_layout", "holdout",
    "caption_order", "add_layout", "question_first", "mcq_answer",
)  # fmt: skip
# The settings each file depends on (each file has its own random stream, and "draw_ask" is made from
# gen.jsonl): a run that reads only some files is the same run whatever the other settings say.
# tests/test_shapes_datasets.py checks that changing any other setting leaves a file byte for byte.
FILE_SETTINGS: dict[str, tuple[str, ...]] = {
    "und.jsonl": ("size", "n_und", "seed", "holdout", "caption_order", "question_first", "mcq_answer"),
    "gen.jsonl": ("size", "n_gen", "seed", "gen_layout", "holdout"),
    "draw_ask.jsonl": ("size", "n_gen", "seed", "gen_layout", "holdout"),
    "edit.jsonl": ("size", "n_edit", "seed", "holdout", "add_layout"),
    "interleaved.jsonl": ("size", "n_interleaved", "seed", "holdout"),
    "heldout_gen.jsonl": ("size", "n_heldout", "seed", "holdout"),
}


def settings_read_by(files: Iterable[str]) -> set[str]:
    """The generator settings that can change any of ``files`` (all of them for a file not listed)."""
    wanted: set[str] = set()
    for name in files:
        wanted |= set(FILE_SETTINGS.get(Path(name).name, SETTINGS))
    return wanted


# meta.json's ``counts`` key for each count setting (folders written before ``settings`` was recorded)
_COUNT_KEYS = {"n_und": "und", "n_gen": "gen", "n_edit": "edit", "n_interleaved": "interleaved",
               "n_heldout": "heldout_gen"}  # fmt: skip


# What a folder written before a setting existed was written with.
_DEFAULTS_BEFORE_RECORDED = {"holdout": "pairs", "caption_order": "scene", "add_layout": "random",
                             "question_first": False, "mcq_answer": "letter"}  # fmt: skip


def recorded_settings(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The ``write_shapes_dataset`` arguments a folder's ``meta.json`` was written with, or None.

    Folders written before ``settings`` was recorded are read from ``seed``, ``size``, ``gen_layout``
    and ``counts`` (the generator writes exactly the asked-for counts); a folder without
    ``gen_layout`` predates canonical layouts and matches no current setting: None. Folders written
    before ``holdout`` existed kept the colour-shape pairs out (``pairs``); before ``caption_order``,
    captions listed objects in the scene's order (``scene``); before ``add_layout``, "add" edits put the
    new object at random (``random``); before ``question_first`` and ``mcq_answer``, the picture came
    first and multiple choice was answered with the letter."""
    if isinstance(meta.get("settings"), dict):
        return {**_DEFAULTS_BEFORE_RECORDED, **meta["settings"]}
    counts = meta.get("counts")
    if not isinstance(counts, dict) or any(k not in meta for k in ("seed", "size", "gen_layout")):
        return None
    if any(c not in counts for c in _COUNT_KEYS.values()):
        return None
    derived = {k: meta[k] for k in ("size", "seed", "gen_layout")}
    derived |= _DEFAULTS_BEFORE_RECORDED
    derived.update({k: counts[c] for k, c in _COUNT_KEYS.items()})
    return {k: derived[k] for k in SETTINGS}


def write_shapes_dataset(
    out: str | Path,
    *,
    size: int = 64,
    n_und: int = 1000,
    n_gen: int = 1000,
    n_edit: int = 500,
    n_interleaved: int = 100,
    n_heldout: int = 100,
    seed: int = 0,
    gen_layout: str = "canonical",
    holdout: str = "captions",
    caption_order: str = "scene",
    add_layout: str = "canonical",
    question_first: bool = False,
    mcq_answer: str = "letter",
    progress: bool = True,
) -> dict[str, Any]:
    """Write every ShapesWorld dataset under ``out``; returns (and writes) ``meta.json``.

    ``holdout`` (:class:`Holdout`): ``captions`` keeps the captions :func:`is_held_out_caption` picks out
    of ``gen.jsonl`` and writes ``heldout_gen.jsonl`` from them; ``pairs`` keeps three colour-shape
    pairs and four-of-a-shape out of every training file and writes ``heldout_gen.jsonl`` from those.
    ``caption_order`` (``CAPTION_ORDERS``): the order ``und.jsonl``'s captions list objects in.
    ``add_layout`` (``ADD_LAYOUTS``): where ``edit.jsonl``'s "add" edits put the new object
    (:func:`edit_pair`); no other file depends on it. ``question_first`` (``Q\n<image>`` instead of
    ``<image>\nQ``) and ``mcq_answer`` (``MCQ_ANSWERS``): how ``und.jsonl`` asks and answers; neither
    draws a random number, so the records are otherwise the same."""
    rule = Holdout.named(holdout)
    check_caption_order(caption_order)  # before anything is written
    if gen_layout not in ("canonical", "random"):
        raise ValueError(f"gen_layout={gen_layout!r}: choose 'canonical' or 'random'")
    if add_layout not in ADD_LAYOUTS:
        raise ValueError(f"add_layout={add_layout!r}: choose {' or '.join(map(repr, ADD_LAYOUTS))}")
    if mcq_answer not in MCQ_ANSWERS:
        raise ValueError(f"mcq_answer={mcq_answer!r}: choose {' or '.join(map(repr, MCQ_ANSWERS))}")
    if not 32 <= size <= 512:
        raise ValueError(f"size={size}: ShapesWorld renders 32 to 512 px")
    for name, n in (("n_und", n_und), ("n_gen", n_gen), ("n_edit", n_edit), ("n_interleaved", n_interleaved),
                    ("n_heldout", n_heldout)):  # fmt: skip
        if n < 0:
            raise ValueError(f"{name}={n}: counts must be >= 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    w = _Writer(out, size)
    bar = tqdm(
        total=n_und + n_gen + n_edit + n_interleaved + n_heldout, desc="shapesworld", disable=not progress
    )

    def und() -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{seed}/und")
        for i in range(n_und):
            scene = _resample(rng, lambda: sample_scene(rng, rng.randint(1, 4)), rule.scene_ok, "scene")
            image = w.image(scene, f"images/und/{i:06d}.png")
            yield understanding_record(rng, scene, image, i, rule, caption_order, question_first, mcq_answer)
            bar.update()

    def gen() -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{seed}/gen")
        for i in range(n_gen):
            category = CATEGORIES[i % len(CATEGORIES)]
            if gen_layout == "canonical":
                spec, scene = _canonical_spec_and_scene(rng, category, rule)
            else:
                spec, scene = _gen_spec_and_scene(rng, category, rule)
            yield _generation_record(rng, w, "gen", i, spec, scene, fill_colours=gen_layout == "random")
            bar.update()

    def edit() -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{seed}/edit")
        for i in range(n_edit):
            op = EDIT_OPS[i % len(EDIT_OPS)]
            source, target, instruction = _resample(
                rng, lambda op=op: edit_pair(rng, op, rule, add_layout),
                lambda r: r is not None and rule.scene_ok(r[1]), op,
            )  # fmt: skip
            images = [
                w.image(source, f"images/edit/{i:06d}_src.png"),
                w.image(target, f"images/edit/{i:06d}_tgt.png"),
            ]
            yield {
                "id": f"edit-{i:06d}",
                "task": "editing",
                "op": op,
                "instruction": instruction,
                "source": source.to_dict(),
                "scene": target.to_dict(),
                "images": images,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{instruction}"},
                    {"from": "gpt", "value": "<image>"},
                ],
            }
            bar.update()

    def interleaved() -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{seed}/interleaved")
        for i in range(n_interleaved):
            spec, scene = _gen_spec_and_scene(rng, rng.choice(CATEGORIES), rule)
            caption = caption_for(spec, scene)
            # Ask only about what the prompt names, or about a shape it does not (answer 0): a
            # counting scene's unnamed distractor is not something the model was asked to draw.
            named = [o.shape for o in spec.objects]
            shape = rng.choice(
                [*named, rng.choice([s for s in SHAPES if s not in {x.shape for x in scene.objects}])]
            )
            question = f"How many {plural(shape)} are there?"
            answer = str(sum(o.shape == shape for o in scene.objects))
            yield {
                "id": f"inter-{i:06d}",
                "task": "interleaved",
                "spec": spec.to_dict(),
                "scene": scene.to_dict(),
                "caption": caption,
                "answer": answer,
                "image": w.image(scene, f"images/interleaved/{i:06d}.png"),
                "conversations": [
                    {"from": "human", "value": generation_prompt(caption, rng)},
                    {"from": "gpt", "value": "<image>"},
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": answer},
                ],
            }
            bar.update()

    def heldout() -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{seed}/heldout")
        for i in range(n_heldout):
            if holdout == "captions":
                spec, scene = _held_out_spec_and_scene(rng, CATEGORIES[i % len(CATEGORIES)])
                yield _generation_record(rng, w, "heldout", i, spec, scene, fill_colours=False)
                bar.update()
                continue
            if i % 2 == 0:
                colour, shape = HELD_OUT_PAIRS[(i // 2) % len(HELD_OUT_PAIRS)]
                scene = sample_scene(rng, 1, fixed=[{"colour": colour, "shape": shape}])
                spec = Spec("colors", [ObjectSpec(shape, colour)])
            else:
                shape = rng.choice(SHAPES)
                scene = sample_scene(
                    rng,
                    HELD_OUT_COUNT,
                    fixed=[{"shape": shape}] * HELD_OUT_COUNT,
                    sizes=[s for s in SIZES if SIZES[s] <= 0.3],
                )
                spec = Spec("counting", [ObjectSpec(shape, count=HELD_OUT_COUNT)])
            yield _generation_record(rng, w, "heldout", i, spec, scene)
            bar.update()

    def draw_ask() -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{seed}/draw_ask")
        with (out / "gen.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                yield draw_ask_record(rng, json.loads(line))

    counts = {
        "und": _jsonl(out / "und.jsonl", und()),
        "gen": _jsonl(out / "gen.jsonl", gen()),
        "draw_ask": _jsonl(out / "draw_ask.jsonl", draw_ask()),  # on gen.jsonl's pictures: after it
        "edit": _jsonl(out / "edit.jsonl", edit()),
        "interleaved": _jsonl(out / "interleaved.jsonl", interleaved()),
        "heldout_gen": _jsonl(out / "heldout_gen.jsonl", heldout()),
    }
    bar.close()
    settings = {
        "size": size, "n_und": n_und, "n_gen": n_gen, "n_edit": n_edit, "n_interleaved": n_interleaved,
        "n_heldout": n_heldout, "seed": seed, "gen_layout": gen_layout, "holdout": holdout,
        "caption_order": caption_order, "add_layout": add_layout, "question_first": question_first,
        "mcq_answer": mcq_answer,
    }  # fmt: skip
    meta = {
        "world": "ShapesWorld",
        "settings": settings,
        "seed": seed,
        "size": size,
        "gen_layout": gen_layout,
        "counts": counts,
        "files": {name: f"{name}.jsonl" for name in counts},
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "relations": list(RELATIONS),
        "holdout": holdout,
        "held_out_pairs": [list(p) for p in rule.pairs],
        "max_count": rule.max_count,
        "held_out_captions": None if holdout == "pairs" else f"sha256 % {CAPTION_HOLDOUT_MODULUS} == 0",
        "num_templates": len(ALL_TEMPLATES),
        "training_files": ["und.jsonl", "gen.jsonl", "draw_ask.jsonl", "edit.jsonl"],
        "eval_files": ["interleaved.jsonl", "heldout_gen.jsonl"],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta
