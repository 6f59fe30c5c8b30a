"""Autoregressive decoding of text tokens and continuous visual tokens in one KV-cached loop.

Text is decoded as usual (greedy, or temperature / top-p sampling). When a row emits
``<|vision_start|>`` (or its prompt ends with one: plain text-to-image), the row switches to image
mode for the generation grid's N tokens: the vision head regresses ``v_1`` from the hidden state at
``<|vision_start|>``, ``v_1`` is fed back as the next input embedding (where teacher-forced training
puts the ground-truth token: the first ``<|image_pad|>``), and so on until ``v_N`` is fed; then
``<|vision_end|>`` is fed and text resumes. A model with ``source_skip`` and a prompt that edits an
image (``Prompt.source_tokens``) also gets the source's token j added to the input that regresses
``v_j`` (the ``<|vision_start|>`` for j = 1, the fed ``v_{j-1}`` after) and, gated, to ``v_j``'s
regression, as training adds them (``model/source_skip.py``).

Positions follow ``sequence.mrope_positions`` (the training code) exactly: text advances
(t, h, w) together; the image's tokens sit at ``(p, p + row, p + col)`` with ``p`` the position after
``<|vision_start|>``; ``<|vision_end|>`` and the text after it continue from ``p + max(rows, cols)``.
The engine always passes explicit 3-row M-RoPE positions, so transformers' cached rope deltas
(which assume only text follows the prompt) are never used.

Batches are left-padded; every row feeds one embedding per step whatever its mode (a finished row
feeds a masked pad), and sampling uses one generator per row seeded by that row's seed, so a
prompt gives the same result alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from orion_mllm.model.orion import OrionModel
from orion_mllm.sequence import EncodedConversation


@dataclass(frozen=True)
class SamplingConfig:
    """How text tokens are chosen; visual tokens are always the vision head's regression."""

    max_new_tokens: int = 256  # text tokens per reply (a started image is always completed)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    allow_images: bool = True  # False: <|vision_start|> is masked out of text sampling

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


@dataclass
class Prompt:
    """A prefilled context: token ids, their M-RoPE positions and the visual tokens at its pads."""

    input_ids: torch.Tensor  # [S] long
    position_ids: torch.Tensor  # [3, S] long (M-RoPE t, h, w)
    visual_tokens: torch.Tensor | None  # [number of <|image_pad|> in input_ids, d]
    next_position: int  # M-RoPE position of the next token
    image_open: bool = False  # the prompt ends with <|vision_start|>: generate an image first
    seed: int = 0
    # Token-space classifier-free guidance for the opened image: ``uncond`` is the same request with
    # its caption dropped (as ``train.prompt_dropout`` trains it). Both branches regress the next
    # token, ``v_u + guidance * (v_c - v_u)`` is fed to both, so each reads the guided image so far.
    # For an MSE head (a fixed-variance Gaussian) that is the mean of the guided distribution.
    uncond: Prompt | None = None
    guidance: float = 1.0
    # The visual tokens [N, d] of the image an image of the reply edits (``sequence.edit_sources``);
    # read only by a model with ``source_skip``.
    source_tokens: torch.Tensor | None = None


@dataclass
class Generated:
    """One row's continuation: every fed token (image pads stand for visual tokens) and its position."""

    token_ids: list[int] = field(default_factory=list)
    position_ids: list[tuple[int, int, int]] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # [N, d] per generated image
    text_tokens: int = 0
    finish_reason: str = ""  # "stop" (a stop token) or "length" (max_new_tokens)


class Engine:
    """Generation with an ``OrionModel`` (any dtype/device it sits on)."""

    def __init__(self, model: OrionModel, *, kv_cache: bool = True) -> None:
        self.model = model
        self.kv_cache = kv_cache
        backbone = model.backbone
        self.lm = backbone.model.language_model
        self.lm_head = backbone.lm_head
        tok = model.processor.tokenizer
        self.tokenizer = tok
        self.vision_start_id = tok.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end_id = tok.convert_tokens_to_ids("<|vision_end|>")
        self.image_pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.pad_id = (
            tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        )
        stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
        gen_cfg = getattr(backbone, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        stops |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.stop_ids = {int(s) for s in stops if s is not None and s >= 0}
        spec = model.config.image_spec
        _, h, w = spec.gen_grid_thw
        self.grid_rows, self.grid_cols = h // spec.merge_size, w // spec.merge_size
        self.image_tokens = self.grid_rows * self.grid_cols
        self.max_positions = int(backbone.config.text_config.max_position_embeddings)

    # ------------------------------------------------------------------ prompts

    def prompt(self, encoded: EncodedConversation, visual_tokens: torch.Tensor | None, *,
               open_image: bool = False, seed: int = 0) -> Prompt:  # fmt: skip
        """A prompt from an encoded conversation (``add_generation_prompt=True``) and its visual tokens;
        ``open_image`` appends ``<|vision_start|>`` so the reply starts with an image."""
        ids = encoded.input_ids
        pos = encoded.position_ids[1:] if encoded.position_ids.shape[0] == 4 else encoded.position_ids
        nxt = int(pos.max()) + 1 if pos.numel() else 0
        if open_image:
            ids = torch.cat([ids, torch.tensor([self.vision_start_id])])
            pos = torch.cat([pos, torch.full((3, 1), nxt, dtype=pos.dtype)], dim=1)
            nxt += 1
        pads = int((ids == self.image_pad_id).sum())
        have = 0 if visual_tokens is None else visual_tokens.shape[0]
        if pads != have:
            raise ValueError(f"prompt has {pads} <|image_pad|> tokens but {have} visual tokens were given")
        return Prompt(ids, pos, visual_tokens, nxt, image_open=open_image, seed=seed,
                      source_tokens=self._reply_source(encoded, visual_tokens))  # fmt: skip

    def _reply_source(
        self, encoded: EncodedConversation, visual_tokens: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The tokens of the image the reply would edit, when it has the generation grid."""
        k = encoded.reply_source_image
        if k is None or visual_tokens is None or encoded.image_grid_thw is None:
            return None
        if tuple(encoded.image_grid_thw[k].tolist()) != tuple(self.model.config.image_spec.gen_grid_thw):
            return None
        start = int(encoded.image_num_tokens[:k].sum())
        return visual_tokens[start : start + int(encoded.image_num_tokens[k])]

    @staticmethod
    def guided(prompt: Prompt, uncond: Prompt, guidance: float) -> Prompt:
        """``prompt`` with classifier-free guidance ``guidance`` against ``uncond`` (w = 1: no guidance)."""
        if not prompt.image_open or not uncond.image_open:
            raise ValueError("guidance needs prompts that open an image (open_image=True)")
        if not guidance >= 0:
            raise ValueError(f"guidance={guidance}: must be >= 0")
        return replace(prompt, uncond=uncond, guidance=float(guidance))

    # ------------------------------------------------------------------ model calls

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(ids.to(self.lm.embed_tokens.weight.device))

    def _source(self, prompt: Prompt, k: int) -> torch.Tensor | None:
        """The edit-source token at cell ``k`` for a model with ``source_skip`` (None when nothing)."""
        skip = self.model.source_skip
        if skip is None or prompt.source_tokens is None or k >= self.image_tokens:
            return None
        return prompt.source_tokens[k].to(skip.output_gate.device)

    def _source_input(self, prompt: Prompt, k: int) -> torch.Tensor | float:
        """What ``source_skip`` adds to the input that regresses visual token ``k`` (0 when nothing)."""
        source = self._source(prompt, k)
        return 0.0 if source is None else self.model.source_skip.inputs(source)

    def _forward(self, embeds, positions, mask, cache):
        out = self.lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
            use_cache=cache is not None, output_hidden_states=self.model.vision_head.needs_all_layers,
        )  # fmt: skip
        if self.model.vision_head.needs_all_layers:
            return out.last_hidden_state[:, -1], torch.stack([h[:, -1] for h in out.hidden_states])
        return out.last_hidden_state[:, -1], None

    # ------------------------------------------------------------------ decoding

    def _choose(self, logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> int:
        logits = logits.float().cpu()
        # <|vision_end|> and <|image_pad|> are the engine's to write (an image's N tokens, then its
        # end): as text they are never valid. A tiny model trained long on generation records puts
        # most of its mass on <|vision_end|> at the start of an answer after its own drawing
        # (benchmarks/SMALL_SCALE.md, session 9), which would end the reply before it starts.
        logits[[self.vision_end_id, self.image_pad_id]] = float("-inf")
        if not cfg.allow_images:
            logits[self.vision_start_id] = float("-inf")
        if cfg.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / cfg.temperature, dim=-1)
        if cfg.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < cfg.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        cfg: SamplingConfig | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Generated]:
        """Continue every prompt until a stop token or ``max_new_tokens`` text tokens.

        ``on_token(row, token_id)`` is called for every text token as it is chosen (streaming)."""
        cfg = cfg or SamplingConfig()
        if not prompts:
            return []
        # Guided prompts bring their unconditional branch as an extra, hidden row: partner[i] = its row.
        # w = 1 needs no second branch (v_u + 1 * (v_c - v_u) = v_c), so it runs exactly unguided.
        asked = len(prompts)
        partner: dict[int, int] = {}
        rows = list(prompts)
        for i, p in enumerate(prompts):
            if p.uncond is not None and p.guidance != 1.0:
                partner[i] = len(rows)
                rows.append(p.uncond)
        prompts = rows
        follower = set(partner.values())
        device = self.lm.embed_tokens.weight.device
        dtype = self.lm.embed_tokens.weight.dtype
        b = len(prompts)
        lengths = [int(p.input_ids.numel()) for p in prompts]
        if min(lengths) == 0:
            raise ValueError("empty prompt")
        s = max(lengths)
        worst = max(p.next_position for p in prompts) + cfg.max_new_tokens + 2 * (self.image_tokens + 2)
        if max(lengths) + cfg.max_new_tokens > self.max_positions or worst > self.max_positions:
            raise ValueError(
                f"context too long: prompt of {max(lengths)} tokens + {cfg.max_new_tokens} new tokens "
                f"exceeds the model's {self.max_positions} positions"
            )
        embeds = torch.zeros(b, s, self.model.hidden_size, device=device, dtype=dtype)
        positions = torch.zeros(3, b, s, dtype=torch.long, device=device)
        mask = torch.zeros(b, s, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            e = self._embed(p.input_ids)
            if p.visual_tokens is not None:
                pad = (p.input_ids == self.image_pad_id).to(device).unsqueeze(-1)
                e = e.masked_scatter(pad, p.visual_tokens.to(device=device, dtype=dtype))
            if p.image_open:  # its last token, <|vision_start|>, regresses v_1
                e[-1] = e[-1] + self._source_input(p, 0)
            embeds[i, s - lengths[i] :] = e
            positions[:, i, s - lengths[i] :] = p.position_ids.to(device)
            mask[i, s - lengths[i] :] = 1
        padded = bool((mask == 0).any())
        cache = None
        if self.kv_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.lm.config)
        history = (embeds, positions, mask)
        last, layers = self._forward(embeds, positions, mask if padded else None, cache)

        outs = [Generated() for _ in prompts]
        gens = [torch.Generator().manual_seed(int(p.seed)) for p in prompts]
        # Per row: next text position, and while an image is open its base position and tokens so far.
        next_pos = [p.next_position for p in prompts]
        image_base: list[int | None] = [p.next_position if p.image_open else None for p in prompts]
        image_done: list[list[torch.Tensor]] = [[] for _ in prompts]
        done = [False] * b
        while not all(done):
            feed = torch.zeros(b, 1, self.model.hidden_size, device=device, dtype=dtype)
            feed_pos = torch.zeros(3, b, 1, dtype=torch.long, device=device)
            feed_mask = torch.zeros(b, 1, dtype=torch.long, device=device)
            text_rows = [i for i in range(b) if not done[i] and image_base[i] is None]
            logits = self.lm_head(last[text_rows]) if text_rows else None
            for i in range(b):
                if done[i]:
                    feed[i, 0] = self._embed(torch.tensor([self.pad_id]))[0]
                    continue
                o = outs[i]
                if i in follower:  # an unconditional branch: fed by its guided row (below)
                    continue
                if image_base[i] is not None:
                    base, k = image_base[i], len(image_done[i])
                    if k < self.image_tokens:  # regress the next visual token and feed it back
                        v = self._regress(last, layers, i, self._source(prompts[i], k))
                        j = partner.get(i)
                        if j is not None:
                            v_u = self._regress(last, layers, j, self._source(prompts[j], k))
                            v = v_u + prompts[i].guidance * (v - v_u)
                            base_j = image_base[j]
                            row, col = divmod(k, self.grid_cols)
                            feed[j, 0] = (v + self._source_input(prompts[j], k + 1)).to(dtype)
                            feed_pos[:, j, 0] = torch.tensor((base_j, base_j + row, base_j + col))
                            feed_mask[j, 0] = 1
                        image_done[i].append(v.float().cpu())
                        row, col = divmod(k, self.grid_cols)
                        feed[i, 0] = (v + self._source_input(prompts[i], k + 1)).to(dtype)
                        pos3 = (base, base + row, base + col)
                        tok = self.image_pad_id
                    else:  # the image is complete: close it
                        if i in partner:  # the unconditional branch has done its work
                            done[partner[i]] = True
                        o.images.append(torch.stack(image_done[i]))
                        image_done[i], image_base[i] = [], None
                        end = base + max(self.grid_rows, self.grid_cols)
                        feed[i, 0] = self._embed(torch.tensor([self.vision_end_id]))[0]
                        pos3, tok = (end, end, end), self.vision_end_id
                        next_pos[i] = end + 1
                else:
                    tok = self._choose(logits[text_rows.index(i)], cfg, gens[i])
                    o.text_tokens += 1
                    if on_token is not None:
                        on_token(i, tok)
                    n = next_pos[i]
                    pos3 = (n, n, n)
                    next_pos[i] = n + 1
                    stop = tok in self.stop_ids
                    if stop or (tok != self.vision_start_id and o.text_tokens >= cfg.max_new_tokens):
                        # The last token is recorded (with its position) but never fed.
                        o.token_ids.append(tok)
                        o.position_ids.append(pos3)
                        o.finish_reason, done[i] = ("stop" if stop else "length"), True
                        continue
                    feed[i, 0] = self._embed(torch.tensor([tok]))[0]
                    if tok == self.vision_start_id:
                        image_base[i] = n + 1
                        feed[i, 0] = feed[i, 0] + self._source_input(prompts[i], 0)
                o.token_ids.append(tok)
                o.position_ids.append(pos3)
                feed_pos[:, i, 0] = torch.tensor(pos3)
                feed_mask[i, 0] = 1
            if all(done):
                break
            if cache is not None:
                mask = torch.cat([mask, feed_mask], dim=1)
                last, layers = self._forward(
                    feed, feed_pos, mask if padded or not feed_mask.all() else None, cache
                )
                padded = padded or not bool(feed_mask.all())
            else:  # no cache: the whole sequence again (the reference the cache is checked against)
                e, p_, m = history
                history = (
                    torch.cat([e, feed], 1),
                    torch.cat([p_, feed_pos], 2),
                    torch.cat([m, feed_mask], 1),
                )
                padded = padded or not bool(feed_mask.all())
                last, layers = self._forward(history[0], history[1], history[2] if padded else None, None)
        return outs[:asked]

    def _regress(
        self, last: torch.Tensor, layers: torch.Tensor | None, row: int, source: torch.Tensor | None
    ) -> torch.Tensor:
        """The vision head's next visual token for one row (with its edit-source token, if any)."""
        head_in = layers[:, row] if layers is not None else last[row]
        sources = None if source is None else source.unsqueeze(0)
        return self.model.predict_visual_tokens(head_in.unsqueeze(-2), sources).squeeze(-2)
