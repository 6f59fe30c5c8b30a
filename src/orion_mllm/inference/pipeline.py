"""What users do with a trained model: ask about images, generate and edit images, chat.

``OrionPipeline`` holds the model (and its decoder when there is one), builds prompts from chat
sessions (user images encoded by the vision tower, generated images kept as their predicted tokens),
runs the ``Engine`` and renders visual tokens with the decoder.

Loading: an ORION model directory (``orion_config.json``), or a plain Qwen2.5-VL directory for
understanding only (it has no trained vision head). The decoder is ``--decoder DIR`` or the model
directory's ``decoder/`` subfolder. On GPU the model runs in bf16; the decoder waits on the CPU
while the LLM runs and moves to the GPU only to render (``offload_decoder``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from orion_mllm.data.records import encode_record
from orion_mllm.decoder.flow import sample, to_pil_images
from orion_mllm.decoder.model import DECODER_CONFIG, OrionDecoder
from orion_mllm.inference.engine import Engine, Generated, Prompt, SamplingConfig
from orion_mllm.inference.session import ChatSession, GeneratedImage, Part, UserImage
from orion_mllm.model.orion import ORION_CONFIG_NAME, OrionModel
from orion_mllm.sequence import EncodedConversation

# Appendix A.1 / section 5: diversity comes from sampling an elaborated prompt, then regressing the image.
ELABORATE_TEMPLATE = "Describe in detail a picture of the following, for an illustrator: {prompt}"
DECODER_SUBDIR = "decoder"
NO_DECODER = "no decoder: pass --decoder DIR or put one in the model directory's decoder/ folder"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[OrionModel, bool]:
    """An ORION model, or a plain Qwen2.5-VL directory wrapped for understanding; (model, is_orion)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if (path / ORION_CONFIG_NAME).is_file():
        model = OrionModel.from_pretrained(path, dtype=dtype)
        return model.to(device).eval(), True
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg}: not valid JSON ({err})") from None
        if model_type == "qwen2_5_vl":
            return OrionModel.from_qwen(path, dtype=dtype).to(device).eval(), False
        raise ValueError(f"{path}: model_type {model_type!r} is not a Qwen2.5-VL / ORION model")
    raise ValueError(f"{path} is not a model directory (no {ORION_CONFIG_NAME} or config.json)")


@dataclass
class Reply:
    text: str
    images: list[GeneratedImage]
    parts: list[Part]  # in order: what was appended to the session as the assistant turn
    finish_reason: str


class OrionPipeline:
    def __init__(
        self,
        model: OrionModel,
        decoder: OrionDecoder | None = None,
        *,
        device: torch.device | None = None,
        is_orion: bool = True,
        offload_decoder: bool = True,
        kv_cache: bool = True,
        image_separator: str | None = None,
    ) -> None:
        self.model = model
        self.device = device or next(model.parameters()).device
        self.is_orion = is_orion
        # What follows an image in a user turn. ORION models learn from LLaVA-style data ("<image>\n" +
        # text); plain Qwen2.5-VL directories get Qwen's own template (text right after the image),
        # unless they too were trained on LLaVA-style data (the ShapesWorld stage-0 base).
        self.image_separator = ("\n" if is_orion else "") if image_separator is None else image_separator
        self.engine = Engine(model, kv_cache=kv_cache)
        self.builder = model.sequence_builder()
        self.decoder = decoder
        self.offload_decoder = offload_decoder and self.device.type != "cpu"
        if decoder is not None:
            decoder.eval().to("cpu" if self.offload_decoder else self.device)

    @classmethod
    def load(
        cls, model_dir: str | Path, decoder_dir: str | Path | None = None, *, device: str = "auto",
        dtype: str = "auto", offload_decoder: bool = True, image_separator: str | None = None,
    ) -> OrionPipeline:  # fmt: skip
        dev = pick_device(device)
        torch_dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32,
                       "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]  # fmt: skip
        model, is_orion = load_model(model_dir, dev, torch_dtype)
        decoder = None
        if decoder_dir is None and (Path(model_dir) / DECODER_SUBDIR / DECODER_CONFIG).is_file():
            decoder_dir = Path(model_dir) / DECODER_SUBDIR
        if decoder_dir is not None:
            decoder = OrionDecoder.from_pretrained(decoder_dir)
            if decoder.config.token_dim != model.hidden_size:
                raise ValueError(
                    f"decoder {decoder_dir} renders {decoder.config.token_dim}-wide tokens but the model's "
                    f"are {model.hidden_size}-wide"
                )
        return cls(
            model, decoder, device=dev, is_orion=is_orion, offload_decoder=offload_decoder,
            image_separator=image_separator,
        )  # fmt: skip

    # ------------------------------------------------------------------ prompts

    def encode(self, session: ChatSession) -> tuple[EncodedConversation, torch.Tensor | None]:
        """The session as an encoded conversation with an open assistant turn, and the visual tokens at
        its pads: user images through the vision tower, generated images as their stored tokens."""
        if not session.turns:
            raise ValueError("empty conversation: nothing to answer")
        spec = self.model.config.image_spec
        placeholder = Image.new("RGB", (spec.gen_image_size, spec.gen_image_size), "white")
        messages, known = session.to_messages(placeholder, self.image_separator)
        enc = encode_record(self.builder, messages, add_generation_prompt=True)
        if enc.pixel_values is None:
            return enc, None
        per_image = enc.image_grid_thw.prod(-1).tolist()
        chunks = torch.split(enc.pixel_values, per_image)
        tokens = []
        for k, (pixels, stored) in enumerate(zip(chunks, known, strict=True)):
            n = int(enc.image_num_tokens[k])
            if stored is None:
                with torch.no_grad():
                    t = self.model.encode_images(
                        pixels.to(self.device), enc.image_grid_thw[k : k + 1].to(self.device)
                    )
            else:
                if tuple(stored.shape) != (n, self.model.hidden_size):
                    raise ValueError(
                        f"generated image {k}: stored tokens have shape {list(stored.shape)}, this model "
                        f"needs [{n}, {self.model.hidden_size}]"
                    )
                t = stored
            tokens.append(t.to(self.device, self.model.backbone.dtype))
        return enc, torch.cat(tokens)

    def prompt(self, session: ChatSession, *, open_image: bool = False, seed: int = 0) -> Prompt:
        if open_image and not self.is_orion:
            raise ValueError("image generation needs an ORION model directory (this one has no vision head)")
        enc, visual = self.encode(session)
        return self.engine.prompt(enc, visual, open_image=open_image, seed=seed)

    def reply_from(self, out: Generated) -> Reply:
        """An engine output as the assistant turn it makes: text pieces and generated images, in order."""
        tok = self.engine.tokenizer
        parts: list[Part] = []
        images: list[GeneratedImage] = []
        texts: list[str] = []
        run: list[int] = []
        image_index = 0

        def flush() -> None:
            if run:
                text = tok.decode(run, skip_special_tokens=True)
                if text:
                    parts.append(text)
                    texts.append(text)
                run.clear()

        previous = None
        for t in out.token_ids:
            prev, previous = previous, t
            if t == self.engine.vision_start_id or t == self.engine.image_pad_id or t in self.engine.stop_ids:
                continue
            if t == self.engine.vision_end_id:
                # An image ends where the engine fed <|vision_end|> after its visual tokens (pads); the
                # same token *sampled* as text by a weak model is a stray special token: dropped.
                if prev != self.engine.image_pad_id:
                    continue
                flush()
                img = GeneratedImage(out.images[image_index])
                image_index += 1
                parts.append(img)
                images.append(img)
                continue
            run.append(t)
        flush()
        return Reply("".join(texts), images, parts, out.finish_reason)

    # ------------------------------------------------------------------ jobs

    def reply(
        self, session: ChatSession, sampling: SamplingConfig | None = None, *, open_image: bool = False,
        seed: int = 0,
    ) -> Reply:  # fmt: skip
        """Continue the session with one assistant turn (appended to it) and return that turn."""
        prompt = self.prompt(session, open_image=open_image, seed=seed)
        out = self.engine.generate([prompt], sampling or SamplingConfig())[0]
        reply = self.reply_from(out)
        session.add("assistant", reply.parts)
        return reply

    def ask(
        self, images: list[Image.Image], question: str, sampling: SamplingConfig | None = None, *,
        system: str | None = None,
    ) -> str:  # fmt: skip
        """Answer a question about images; ``system`` is a system prompt for the chat template. The
        pictures come before the question, or after it for a model trained so (:attr:`question_first`)."""
        if not question.strip():
            raise ValueError("empty question")
        session = ChatSession(system_prompt=system)
        pictures = [UserImage(im) for im in images]
        if images and self.question_first:  # as the model's data put it: "Q\n<image>"
            session.add("user", [f"{question}\n", *pictures])
        else:
            session.add("user", [*pictures, question])
        sampling = sampling or SamplingConfig(allow_images=False)
        return self.reply(session, sampling).text

    @property
    def question_first(self) -> bool:
        """Whether the model was trained asking before the picture (``OrionConfig.question_first``; a
        plain Qwen2.5-VL directory: no)."""
        return self.is_orion and self.model.config.question_first

    @property
    def default_guidance(self) -> float:
        """The token-space guidance the model was trained for (1.0 for plain Qwen2.5-VL directories)."""
        return self.model.config.guidance

    def image_tokens(
        self, prompt: str, *, n: int = 1, seed: int = 0, elaborate: bool = False, temperature: float = 1.0,
        source: Image.Image | None = None, guidance: float | None = None, system: str | None = None,
    ) -> tuple[list[torch.Tensor], list[str]]:  # fmt: skip
        """Visual tokens of ``n`` images for a request (an edit when ``source`` is given), batched; with
        ``elaborate`` each first samples a detailed prompt (different per seed), giving diverse images;
        ``guidance`` > 1 steers the tokens away from the caption-less prediction (token-space CFG;
        None: the model's own default). ``system``: a system prompt for every prompt involved."""
        if not prompt.strip():
            raise ValueError("empty prompt")
        requests = [prompt] * n
        if elaborate:
            asks = []
            for k in range(n):
                s = ChatSession(system_prompt=system)
                s.add("user", [ELABORATE_TEMPLATE.format(prompt=prompt)])
                asks.append(self.prompt(s, seed=seed + k))
            cfg = SamplingConfig(max_new_tokens=96, temperature=temperature, top_p=0.95, allow_images=False)
            outs = self.engine.generate(asks, cfg)
            requests = [self.reply_from(o).text.strip() or prompt for o in outs]
        sources = None if source is None else [source] * n
        prompts = self.image_prompts(requests, seed=seed, sources=sources, guidance=guidance, system=system)
        # One text token after the image closes the loop (the image itself is always completed).
        outs = self.engine.generate(prompts, SamplingConfig(max_new_tokens=1, allow_images=False))
        return [o.images[0] for o in outs], requests

    def image_prompts(
        self, requests: Sequence[str], *, seed: int = 0, sources: Sequence[Image.Image] | None = None,
        guidance: float | None = None, system: str | None = None,
    ) -> list[Prompt]:  # fmt: skip
        """One prompt per request whose reply starts with an image (an edit of ``sources[k]`` when
        given); request k gets seed ``seed + k``. With ``guidance`` != 1 each prompt carries its
        unconditional twin: the same turn without the request's text (the source image and the system
        prompt kept), which is what ``train.prompt_dropout`` trains the model on. ``guidance`` None: the
        model's own default (``orion_config.json``)."""
        guidance = self.default_guidance if guidance is None else guidance
        if sources is not None and len(sources) != len(requests):
            raise ValueError(f"{len(sources)} source images for {len(requests)} requests")
        prompts = []
        for k, req in enumerate(requests):
            image = [UserImage(sources[k])] if sources is not None else []
            s = ChatSession(system_prompt=system)
            s.add("user", [*image, req])
            p = self.prompt(s, open_image=True, seed=seed + k)
            if guidance != 1.0:
                u = ChatSession(system_prompt=system)
                u.add("user", image or [""])
                p = self.engine.guided(p, self.prompt(u, open_image=True, seed=seed + k), guidance)
            prompts.append(p)
        return prompts

    def render(
        self,
        tokens: list[torch.Tensor],
        *,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
    ) -> list[Image.Image]:
        """Decoder renderings of token sets; ``seeds`` (one per image) makes each image independent of
        its batch (``decoder.flow.sample``)."""
        if self.decoder is None:
            raise ValueError(NO_DECODER)
        dec = self.decoder
        dev = self.device
        dec.to(dev)
        try:
            batch = torch.stack([t.float() for t in tokens]).to(dev, next(dec.parameters()).dtype)
            pixels = sample(dec, batch, steps=steps, cfg_scale=cfg_scale, seed=seed, seeds=seeds)
        finally:
            if self.offload_decoder:
                dec.to("cpu")
        return to_pil_images(pixels)
