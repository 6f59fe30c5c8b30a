"""From mixture positions to this rank's micro-batches for one optimizer step.

Optimizer step ``s`` consumes global positions ``[s*G, (s+1)*G)`` of the mixture stream (G = the
recipe's global batch size); rank ``r`` of ``W`` encodes every W-th of them. A record or image that
cannot be read is skipped and reported (``BadSample``: where and why) instead of stopping the run.
Good samples are packed first-fit-decreasing into rows of at most ``pack_tokens`` tokens (one row
per micro-batch, so no padding at all), or, with packing off, padded into micro-batches of
``micro_batch_size`` samples.

Because the step's data is a pure function of the step number, a resumed run reads exactly what an
uninterrupted one would; ``Prefetcher`` encodes the next step in a background thread meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from orion_mllm.data.conditioning import drop_prompt, dropout_rng
from orion_mllm.data.mixture import MixtureSampler
from orion_mllm.data.packing import collate_packed, pack_first_fit_decreasing
from orion_mllm.data.records import encode_record
from orion_mllm.data.sources import DataError, DatasetSource, open_dataset
from orion_mllm.images import ImageLoadError
from orion_mllm.sequence import (
    IGNORE_INDEX,
    Batch,
    ConversationError,
    EncodedConversation,
    SequenceBuilder,
    collate,
)

# What a bad record can raise while being read and encoded. Anything else is a bug and propagates.
BAD_RECORD_ERRORS = (DataError, ConversationError, ImageLoadError, OSError, UnicodeDecodeError)


@dataclass(frozen=True)
class BadSample:
    source: str
    reason: str


@dataclass
class StepData:
    micro_batches: list[Batch] = field(default_factory=list)
    good: int = 0
    bad: list[BadSample] = field(default_factory=list)

    @property
    def real_tokens(self) -> int:
        return sum(b.num_real_tokens for b in self.micro_batches)

    @property
    def slots(self) -> int:
        return sum(int(b.input_ids.numel()) for b in self.micro_batches)


def open_mixture(recipe) -> tuple[list[DatasetSource], MixtureSampler]:
    """Open every ``data`` entry of a recipe (stage or decoder) and the weighted mixture over them."""
    sources = [open_dataset(e, recipe.data_root, seed=recipe.train.seed) for e in recipe.data]
    sampler = MixtureSampler(
        [len(s) for s in sources],
        [e.weight for e in recipe.data],
        seed=recipe.train.seed,
        names=[e.name for e in recipe.data],
    )
    return sources, sampler


def text_targets(batch: Batch) -> int:
    """Positions whose next token is a supervised text token (what CE averages over)."""
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def visual_targets(batch: Batch) -> int:
    """Positions that predict a visual token (what MSE and KL average over)."""
    return int(batch.visual_positions.shape[0])


class StepLoader:
    def __init__(
        self,
        sources: Sequence[DatasetSource],
        sampler: MixtureSampler,
        builder: SequenceBuilder,
        *,
        global_batch_size: int,
        rank: int,
        world_size: int,
        packing: bool,
        pack_tokens: int,
        micro_batch_size: int,
        pad_token_id: int,
        prompt_dropout: float = 0.0,
        seed: int = 0,
        regress_images: Sequence[bool] | None = None,
    ) -> None:
        if global_batch_size < world_size:
            raise ValueError(
                f"train.global_batch_size={global_batch_size} is smaller than the {world_size} processes"
            )
        self.sources = list(sources)
        self.sampler = sampler
        self.builder = builder
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.packing = packing
        self.pack_tokens = pack_tokens
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id
        self.prompt_dropout = prompt_dropout
        self.seed = seed
        # Per source: whether its assistant pictures are regressed (DatasetEntry.regress_images).
        self.regress_images = (
            list(regress_images) if regress_images is not None else [True] * len(self.sources)
        )
        if len(self.regress_images) != len(self.sources):
            raise ValueError(
                f"regress_images: {len(self.regress_images)} flags for {len(self.sources)} datasets"
            )

    def positions(self, step: int) -> list[tuple[int, int]]:
        picks = self.sampler.take(step * self.global_batch_size, self.global_batch_size)
        return picks[self.rank :: self.world_size]

    def encode(self, dataset: int, index: int, slot: int = 0) -> EncodedConversation | BadSample:
        """Sample ``index`` of ``dataset``, read at global mixture position ``slot``."""
        source = self.sources[dataset]
        where = f"{source.name}[{index}]"
        try:
            raw = source.get(index)
            where = raw.source
            record = raw.record
            if self.prompt_dropout > 0 and dropout_rng(self.seed, slot).random() < self.prompt_dropout:
                record = drop_prompt(record, raw.source) or record
            encoded = encode_record(
                self.builder, record, record_id=raw.source, regress_images=self.regress_images[dataset]
            )
        except BAD_RECORD_ERRORS as err:
            return BadSample(where, f"{type(err).__name__}: {err}")
        if self.packing and len(encoded) > self.pack_tokens:
            return BadSample(where, f"{len(encoded)} tokens > train.pack_tokens={self.pack_tokens}")
        return encoded

    def load(self, step: int) -> StepData:
        data = StepData()
        items: list[EncodedConversation] = []
        first = step * self.global_batch_size + self.rank
        for k, (dataset, index) in enumerate(self.positions(step)):
            out = self.encode(dataset, index, slot=first + k * self.world_size)
            if isinstance(out, BadSample):
                data.bad.append(out)
            else:
                items.append(out)
        data.good = len(items)
        if not items:
            return data
        if self.packing:
            bins = pack_first_fit_decreasing([len(x) for x in items], self.pack_tokens)
            data.micro_batches = [collate_packed([[items[i] for i in b]], self.pad_token_id) for b in bins]
        else:
            m = self.micro_batch_size
            data.micro_batches = [
                collate(items[i : i + m], self.pad_token_id) for i in range(0, len(items), m)
            ]
        return data


class Prefetcher:
    """Loads step ``s + 1`` in a background thread while step ``s`` trains."""

    def __init__(self, loader: StepLoader) -> None:
        self.loader = loader
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orion-data")
        self.pending: dict[int, Future] = {}

    def get(self, step: int, next_step: int | None) -> StepData:
        fut = self.pending.pop(step, None)
        data = fut.result() if fut is not None else self.loader.load(step)
        if next_step is not None and next_step not in self.pending:
            self.pending[next_step] = self.pool.submit(self.loader.load, next_step)
        return data

    def close(self) -> None:
        for fut in self.pending.values():
            fut.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
