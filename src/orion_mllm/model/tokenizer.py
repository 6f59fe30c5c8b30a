"""A small Qwen2-style tokenizer built locally, for the ``micro`` / ``tiny`` presets.

Real Qwen2.5-VL checkpoints bring their own tokenizer; the small presets cannot download one, so we
train a byte-level BPE with the ``tokenizers`` library on an embedded English corpus, using the
same normaliser, pre-tokeniser regex and decoder as Qwen2, then append Qwen2.5-VL's special tokens
in Qwen's order and attach Qwen2.5-VL's chat template. The result is a ``Qwen2Tokenizer`` that is
saved and loaded exactly like a real one (``save_pretrained`` / ``AutoTokenizer.from_pretrained``).
"""

from __future__ import annotations

import itertools
import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

# Qwen2.5-VL's added tokens, in the order (and so relative ids) of the released tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen2.5-VL-Instruct's chat template (images and videos as vision_start + pad + vision_end).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenisation regex (contractions, letters, single digits, punctuation, newlines, spaces).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Words the embedded corpus is made of: the ShapesWorld domain plus everyday English, so that the
# BPE merges cover what the small models are trained on while any byte string still encodes.
_DOMAIN_WORDS = """
circle square triangle star hexagon pentagon diamond ellipse rectangle cross heart ring shape
shapes object objects red green blue yellow orange purple pink white black gray grey brown cyan
magenta colour color colours colors small medium large big tiny left right above below top bottom
middle centre center next to near far beside between behind front image picture photo drawing scene
background canvas one two three four five six seven eight nine ten zero count many how what which
where is are there a an the of in on with and or but not no yes it its this that these those some
any each every generate draw create make show render paint produce sketch edit change recolour
recolor move remove add swap replace turn into please could would can you me i like want see give
let here now answer question option options choose correct describe caption contains containing has
have
""".split()  # noqa: SIM905 - a word list reads better as text
_ENGLISH_WORDS = """
time person year way day thing man world life hand part child eye woman place work week case point
number group problem fact be have do say get make go know take see come think look want give use
find tell ask work seem feel try leave call good new first last long great little own other old
right big high different small large next early young important few public bad same able to of in
for on with at by from up about into over after beneath under around through during without again
further then once all both each more most other such only own so than too very just should now the
model learns understands generates images text tokens visual vision language unified training
""".split()  # noqa: SIM905 - a word list reads better as text
_TEMPLATES = (
    "{a} {b} {c}.",
    "Draw {a} {b} {c} next to {d} {e}.",
    "Is there {a} {b} {c} in the image?",
    "How many {c} are there? {n}.",
    "The {b} {c} is to the left of the {e}.",
    "Please generate a picture of {a} {b} {c}.",
    "Could you show me {n} {b} {c}s?",
    "Answer with the option's letter: A. {b} B. {d} C. {e} D. {c}",
    "{A} {b} {c} above {d} {e}, on a {f} background.",
    "Change the colour of the {c} to {d}.",
)


def _training_corpus(num_sentences: int = 6000, seed: int = 0) -> list[str]:
    """Deterministic sentences mixing domain words, common English, digits and punctuation."""
    rng = random.Random(seed)
    words = _DOMAIN_WORDS + _ENGLISH_WORDS
    lines = []
    for i in range(num_sentences):
        template = _TEMPLATES[i % len(_TEMPLATES)]
        fill = {k: rng.choice(words) for k in "abcdef"}
        fill["A"] = fill["a"].capitalize()
        fill["n"] = str(rng.randint(0, 12))
        lines.append(template.format(**fill))
    # Every word alone, capitalised and with a leading space, so each gets merged as a whole.
    lines.extend(itertools.chain.from_iterable((w, " " + w, w.capitalize()) for w in words))
    return lines


def build_tokenizer(vocab_size: int = 1024, model_max_length: int = 32768) -> Qwen2Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` regular tokens and wrap it as a Qwen2.5-VL tokenizer.

    The special tokens come after the regular vocabulary, in Qwen2.5-VL's order; the chat template is
    Qwen2.5-VL's. Deterministic: the same ``vocab_size`` gives the same vocabulary and merges.
    """
    if vocab_size < 300:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 base tokens + merges"
        )
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)
    vocab = dict(sorted(bpe.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1]))
    merges = _merges_of(bpe)
    first_special = len(vocab)
    # Reserve the special tokens' ids in the vocabulary itself so that Qwen2Tokenizer's own
    # registration of eos/pad (in whatever order it does it) cannot reshuffle them.
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = first_special + offset

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
        errors="replace",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    _check_special_token_order(tokenizer, first_id=first_special)
    return tokenizer


def _merges_of(bpe: Tokenizer) -> list[tuple[str, str]]:
    """Read the learned merges back out of a trained BPE (the tokenizers API exposes them via JSON)."""
    import json

    model = json.loads(bpe.to_str())["model"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def _check_special_token_order(tokenizer: Qwen2Tokenizer, first_id: int) -> None:
    """The model config stores special-token ids; make sure they are where we think they are."""
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    expected = list(range(first_id, first_id + len(SPECIAL_TOKENS)))
    if ids != expected:
        raise RuntimeError(f"special tokens got ids {ids}, expected {expected}")
