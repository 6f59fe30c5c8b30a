"""MixtureSampler: quotas follow weights, epochs cover datasets, order is a pure function of position."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest

from orion_mllm.data.mixture import MixtureSampler


def test_quota_sums_and_follows_weights():
    m = MixtureSampler([100, 50, 10], [1.0, 1.0, 2.0], seed=0)
    assert m.samples_per_epoch == 160
    assert m.quota() == [40, 40, 80]
    assert sum(m.quota()) == m.samples_per_epoch
    # Largest remainder: shares 33.3, 33.3, 33.3 -> one extra to the first (ties by index).
    assert MixtureSampler([50, 50, 1], [1, 1, 1], seed=0).quota() == [34, 34, 33]
    # A tiny weight still gets one draw per epoch.
    tiny = MixtureSampler([1000, 3], [1.0, 1e-9], seed=0)
    assert tiny.quota() == [1002, 1]
    # Weights proportional to sizes give quota == sizes exactly, despite float shares like 0.3.
    assert MixtureSampler([3, 7], [0.3, 0.7], seed=0).quota() == [3, 7]


def test_epoch_counts_match_quota():
    m = MixtureSampler([30, 20, 5], [2.0, 1.0, 1.0], seed=3)
    for epoch in range(3):
        counts = Counter(d for d, _ in m.epoch_order(epoch))
        assert [counts[i] for i in range(3)] == m.quota()


def test_weights_proportional_to_sizes_cover_every_record_once():
    sizes = [7, 13, 4]
    m = MixtureSampler(sizes, [float(s) for s in sizes], seed=1)
    assert m.quota() == sizes
    for epoch in range(2):
        order = m.epoch_order(epoch)
        for d, size in enumerate(sizes):
            assert sorted(r for dd, r in order if dd == d) == list(range(size))


def test_determinism_and_variation():
    a = MixtureSampler([20, 10], [1.0, 1.0], seed=0)
    b = MixtureSampler([20, 10], [1.0, 1.0], seed=0)
    c = MixtureSampler([20, 10], [1.0, 1.0], seed=1)
    assert a.epoch_order(0) == b.epoch_order(0)
    assert a.epoch_order(1) == b.epoch_order(1)
    assert a.epoch_order(0) != a.epoch_order(1)
    assert a.epoch_order(0) != c.epoch_order(0)
    # A sampler survives pickling (DataLoader workers) with the same order.
    assert pickle.loads(pickle.dumps(a)).epoch_order(2) == a.epoch_order(2)


def test_take_and_at_across_epoch_boundary():
    m = MixtureSampler([5, 3, 4], [1.0, 2.0, 1.0], seed=7)
    n = m.samples_per_epoch
    flat = m.epoch_order(0) + m.epoch_order(1) + m.epoch_order(2)
    assert m.take(0, n) == flat[:n]
    assert m.take(n - 4, 9) == flat[n - 4 : n + 5]
    assert m.take(3, 2 * n + 1) == flat[3 : 2 * n + 4]
    assert m.take(5, 0) == []
    assert [m.at(p) for p in range(3 * n)] == flat
    # A fresh sampler ("resumed run") asked at an arbitrary position agrees.
    resumed = MixtureSampler([5, 3, 4], [1.0, 2.0, 1.0], seed=7)
    assert resumed.take(n + 2, 6) == flat[n + 2 : n + 8]
    with pytest.raises(ValueError):
        m.at(-1)


def test_upsampling_sees_every_record_before_repeating():
    m = MixtureSampler([100, 6], [1.0, 1.0], seed=0)
    assert m.quota() == [53, 53]  # dataset 1 (6 records) drawn ~9x per epoch
    # 53 draws of 6 records: every record 8 or 9 times, none a 10th time before all had 9.
    draws = [r for d, r in m.epoch_order(0) if d == 1]
    counts = Counter(draws)
    assert set(counts) == set(range(6))
    assert max(counts.values()) - min(counts.values()) <= 1
    # The underlying stream is whole permutations: each block of 6 covers all records.
    stream = m._stream(1, 0, 53).tolist()
    for k in range(53 // 6):
        assert sorted(stream[6 * k : 6 * k + 6]) == list(range(6))


def test_downsampling_continues_across_epochs():
    m = MixtureSampler([10, 90], [1.0, 1.0], seed=2)
    q = m.quota()[1]  # 50 of 90 per epoch
    seen = [r for e in range(2) for d, r in m.epoch_order(e) if d == 1]
    assert len(seen) == 2 * q
    assert set(seen[: 2 * q]) == set(range(90))  # first 90 stream entries are a full permutation


def test_state_roundtrip_and_changes_detected():
    m = MixtureSampler([10, 20], [1.0, 2.0], seed=5, names=["und", "gen"])
    state = m.state_dict()
    assert state == {"sizes": [10, 20], "weights": [1.0, 2.0], "seed": 5, "names": ["und", "gen"]}
    m.check_state(state)  # same mixture: fine
    MixtureSampler([10, 20], [1.0, 2.0], seed=5, names=["a", "b"]).check_state(state)  # renames are fine
    with pytest.raises(ValueError, match=r"'gen' size 20 -> 21"):
        MixtureSampler([10, 21], [1.0, 2.0], seed=5, names=["und", "gen"]).check_state(state)
    with pytest.raises(ValueError, match=r"'und' weight 1.0 -> 3.0"):
        MixtureSampler([10, 20], [3.0, 2.0], seed=5, names=["und", "gen"]).check_state(state)
    with pytest.raises(ValueError, match=r"seed 5 -> 6"):
        MixtureSampler([10, 20], [1.0, 2.0], seed=6, names=["und", "gen"]).check_state(state)
    with pytest.raises(ValueError, match=r"number of datasets 2 -> 3"):
        MixtureSampler([10, 20, 1], [1.0, 2.0, 1.0], seed=5).check_state(state)


def test_validation():
    with pytest.raises(ValueError, match="no datasets"):
        MixtureSampler([], [], seed=0)
    with pytest.raises(ValueError, match="'empty' has 0 records"):
        MixtureSampler([3, 0], [1.0, 1.0], seed=0, names=["ok", "empty"])
    with pytest.raises(ValueError, match="weight 0"):
        MixtureSampler([3, 3], [1.0, 0.0], seed=0)
    with pytest.raises(ValueError, match="weight -1"):
        MixtureSampler([3, 3], [1.0, -1.0], seed=0)
    with pytest.raises(ValueError, match="differ"):
        MixtureSampler([3, 3], [1.0], seed=0)
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler([3], [1.0], seed=-1)
