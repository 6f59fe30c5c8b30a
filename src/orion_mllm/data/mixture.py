"""Deterministic weighted mixture of datasets, addressed by a global sample position.

``MixtureSampler(sizes, weights, seed=...)`` decides which record of which dataset is the p-th
training sample, as a pure function of (sizes, weights, seed, p). The sampler holds no position:
the trainer stores ``position`` (samples consumed) in its checkpoint and asks ``take(position, n)``,
so a resumed run sees exactly the samples an uninterrupted one would. ``state_dict()`` /
``check_state()`` catch a resume with a different mixture, which would silently change the order.

An epoch is ``samples_per_epoch = sum(sizes)`` draws; the weights re-balance how those draws are
split (``quota()``, largest-remainder rounding, at least one draw per dataset). Dataset i's draws
walk an endless stream of permutations of its records (permutation k seeded by (seed, i, k)), so an
upsampled dataset shows every record before repeating one, and a downsampled one continues in the
next epoch where it stopped, covering all records over epochs. The epoch's draws are then shuffled
together by a (seed, epoch) generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

# Domain tags in the seed sequences keep the per-dataset streams and the epoch shuffles independent
# even when their other numbers coincide.
_STREAM_TAG = 0x5EED_0001
_SHUFFLE_TAG = 0x5EED_0002


class MixtureSampler:
    """Maps a global position to (dataset index, record index); see the module docstring."""

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        *,
        seed: int,
        names: Sequence[str] | None = None,
    ):
        self.names = [str(n) for n in names] if names is not None else [f"#{i}" for i in range(len(sizes))]
        if not sizes:
            raise ValueError("mixture: no datasets")
        if len(weights) != len(sizes) or len(self.names) != len(sizes):
            raise ValueError(
                f"mixture: {len(sizes)} sizes, {len(weights)} weights and {len(self.names)} names differ"
            )
        for name, size, weight in zip(self.names, sizes, weights, strict=True):
            if int(size) != size or size <= 0:
                raise ValueError(f"mixture: dataset {name!r} has {size} records (need at least one)")
            if not weight > 0 or not np.isfinite(weight):  # `not >` also catches NaN
                raise ValueError(f"mixture: dataset {name!r} has weight {weight} (must be > 0 and finite)")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"mixture: seed must be a non-negative integer, got {seed}")
        self.sizes = [int(s) for s in sizes]
        self.weights = [float(w) for w in weights]
        self.seed = int(seed)
        self.samples_per_epoch = sum(self.sizes)
        self._quota = self._compute_quota()
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (datasets, records)

    # -- quotas

    def _compute_quota(self) -> list[int]:
        # Exact rationals: float shares like 3/10 * 10 = 2.9999... would make the rounding depend on
        # the order of float operations; Fraction(float) is exact, so the result is too.
        total = self.samples_per_epoch
        fractions = [Fraction(w) for w in self.weights]
        weight_sum = sum(fractions)
        shares = [f / weight_sum * total for f in fractions]
        quota = [int(s) for s in shares]  # floor: shares are positive
        by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - quota[i]), i))
        for i in by_remainder[: total - sum(quota)]:
            quota[i] += 1
        # Every dataset with weight > 0 gets at least one draw, paid by the largest quota (always > 1
        # while some quota is 0, because total >= number of datasets).
        for i in range(len(quota)):
            if quota[i] == 0:
                donor = max(range(len(quota)), key=lambda j: (quota[j], -j))
                quota[donor] -= 1
                quota[i] = 1
        return quota

    def quota(self) -> list[int]:
        """Draws per dataset per epoch; sums to ``samples_per_epoch``."""
        return list(self._quota)

    # -- order

    def _stream(self, dataset: int, start: int, count: int) -> np.ndarray:
        """Entries [start, start+count) of dataset's endless stream of record permutations."""
        size = self.sizes[dataset]
        first, last = start // size, (start + count - 1) // size
        perms = [
            np.random.default_rng([self.seed, _STREAM_TAG, dataset, k]).permutation(size)
            for k in range(first, last + 1)
        ]
        offset = start - first * size
        return np.concatenate(perms)[offset : offset + count]

    def _epoch_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch < 0:
            raise ValueError(f"mixture: epoch must be >= 0, got {epoch}")
        cached = self._cache.get(epoch)
        if cached is not None:
            return cached
        datasets = np.repeat(np.arange(len(self.sizes), dtype=np.int64), self._quota)
        records = np.concatenate(
            [self._stream(i, epoch * q, q).astype(np.int64) for i, q in enumerate(self._quota)]
        )
        order = np.random.default_rng([self.seed, _SHUFFLE_TAG, epoch]).permutation(len(datasets))
        result = (datasets[order], records[order])
        # Keep two epochs: enough for a window that straddles a boundary, bounded memory otherwise.
        if len(self._cache) >= 2:
            self._cache.pop(min(self._cache))
        self._cache[epoch] = result
        return result

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """(dataset index, record index) for every draw of one epoch, in training order."""
        datasets, records = self._epoch_arrays(epoch)
        return list(zip(datasets.tolist(), records.tolist(), strict=True))

    def at(self, position: int) -> tuple[int, int]:
        """The sample at a global position; ``position // samples_per_epoch`` is its epoch."""
        if position < 0:
            raise ValueError(f"mixture: position must be >= 0, got {position}")
        epoch, offset = divmod(position, self.samples_per_epoch)
        datasets, records = self._epoch_arrays(epoch)
        return int(datasets[offset]), int(records[offset])

    def take(self, start: int, count: int) -> list[tuple[int, int]]:
        """Samples at positions [start, start + count), across epoch boundaries as needed."""
        if start < 0 or count < 0:
            raise ValueError(f"mixture: start and count must be >= 0, got {start}, {count}")
        out: list[tuple[int, int]] = []
        position, end = start, start + count
        while position < end:
            epoch, offset = divmod(position, self.samples_per_epoch)
            stop = min(self.samples_per_epoch, offset + end - position)
            datasets, records = self._epoch_arrays(epoch)
            out.extend(zip(datasets[offset:stop].tolist(), records[offset:stop].tolist(), strict=True))
            position += stop - offset
        return out

    # -- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What identifies this mixture; store it next to ``position`` in a checkpoint."""
        return {
            "sizes": list(self.sizes),
            "weights": list(self.weights),
            "seed": self.seed,
            "names": list(self.names),
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError naming what differs if ``state`` came from a different mixture.

        Names are informational (a renamed dataset draws the same order); sizes, weights and seed
        decide the order, so any change there means the checkpoint's position would point elsewhere.
        """
        changes: list[str] = []
        old_sizes = [int(s) for s in state.get("sizes", [])]
        old_weights = [float(w) for w in state.get("weights", [])]
        old_names = list(state.get("names") or self.names)
        if len(old_sizes) != len(self.sizes):
            changes.append(f"number of datasets {len(old_sizes)} -> {len(self.sizes)}")
        else:
            for i, (old, new) in enumerate(zip(old_sizes, self.sizes, strict=True)):
                if old != new:
                    changes.append(f"dataset {self._label(i, old_names)} size {old} -> {new}")
            for i, (old, new) in enumerate(zip(old_weights, self.weights, strict=False)):
                if old != new:
                    changes.append(f"dataset {self._label(i, old_names)} weight {old} -> {new}")
            if len(old_weights) != len(self.weights):
                changes.append(f"weights {old_weights} -> {self.weights}")
        if state.get("seed") != self.seed:
            changes.append(f"seed {state.get('seed')} -> {self.seed}")
        if changes:
            raise ValueError(
                "data mixture differs from the checkpoint's, so its position would select other samples: "
                + "; ".join(changes)
            )

    def _label(self, i: int, old_names: Sequence[str]) -> str:
        new = self.names[i]
        old = old_names[i] if i < len(old_names) else new
        return repr(new) if old == new else f"{old!r}/{new!r}"

    def __repr__(self) -> str:
        return (
            f"MixtureSampler(sizes={self.sizes}, weights={self.weights}, seed={self.seed}, "
            f"quota={self._quota})"
        )
