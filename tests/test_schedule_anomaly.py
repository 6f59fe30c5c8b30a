"""LR schedules (Table 1 shapes) and anomalous-step skipping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from orion_mllm.train.anomaly import AnomalyGuard, TrainingDiverged
from orion_mllm.train.schedule import LRSchedule, build_scheduler


def test_warmup_then_constant():
    s = LRSchedule(max_lr=1e-3, min_lr=1e-3, scheduler="constant", warmup_ratio=0.05, total_steps=100)
    assert s.warmup_steps == 5
    assert [s.lr_at(i) for i in range(5)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert all(s.lr_at(i) == 1e-3 for i in range(5, 100))


def test_cosine_reaches_min_at_the_last_step():
    s = LRSchedule(max_lr=1e-4, min_lr=1e-5, scheduler="cosine", warmup_ratio=0.05, total_steps=202)
    warm = s.warmup_steps
    assert warm == 11
    assert s.lr_at(warm) == pytest.approx(1e-4)
    assert s.lr_at(201) == pytest.approx(1e-5)
    assert s.lr_at(warm + 95) == pytest.approx(5.5e-5)  # half way through the decay: the mean of max and min
    lrs = [s.lr_at(i) for i in range(warm, 202)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # monotone decay
    zero_min = LRSchedule(1e-4, 0.0, "cosine", 0.05, 50)
    assert zero_min.lr_at(49) == pytest.approx(0.0, abs=1e-12)


def test_lambda_scheduler_follows_and_resumes():
    sched = LRSchedule(1e-3, 1e-4, "cosine", 0.1, 30)
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW(params, lr=1.0)
    lr_sched = build_scheduler(opt, sched)
    seen = []
    for _ in range(30):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        lr_sched.step()
    assert seen == pytest.approx([sched.lr_at(i) for i in range(30)])
    # Resume at step 12 from a state dict: same LRs as the straight run.
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    straight = build_scheduler(opt2, sched)
    for _ in range(12):
        opt2.step()
        straight.step()
    opt3 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = build_scheduler(opt3, sched)
    resumed.load_state_dict(straight.state_dict())
    opt3.param_groups[0]["lr"] = resumed.get_last_lr()[0]
    assert opt3.param_groups[0]["lr"] == pytest.approx(seen[12])


def test_bad_schedules():
    with pytest.raises(ValueError, match="total_steps"):
        LRSchedule(1e-3, 1e-3, "constant", 0.05, 0)
    with pytest.raises(ValueError, match="scheduler"):
        LRSchedule(1e-3, 1e-3, "linear", 0.05, 10)


def test_nan_and_spikes_are_skipped_and_counted():
    guard = AnomalyGuard(spike_factor=10, window=50, min_history=5, max_consecutive=3)
    for _ in range(10):
        assert guard.check(1.0, 2.0) is False
    assert guard.check(float("nan"), 2.0) is True
    assert guard.check(1.0, float("inf")) is True
    assert guard.check(1.0, 2.0) is False  # a good step resets the run
    assert guard.check(1.0, 25.0) is True  # > 10 x median 2.0
    assert guard.check(1.0, 19.0) is False
    assert guard.skipped == 3 and guard.consecutive == 0
    assert "running median" in guard.reason(1.0, 100.0)


def test_spike_rule_waits_for_history_and_k_in_a_row_abort():
    guard = AnomalyGuard(spike_factor=10, min_history=5, max_consecutive=3)
    assert guard.check(1.0, 1000.0) is False  # no history yet: cannot call it a spike
    guard.check(float("nan"), 1.0)
    guard.check(float("nan"), 1.0)
    with pytest.raises(
        TrainingDiverged, match="3 anomalous steps in a row at step 7 \\(last: loss is nan\\)"
    ):
        guard.check(float("nan"), 1.0, step=7)


def test_guard_state_round_trip():
    guard = AnomalyGuard(min_history=2)
    for g in (1.0, 2.0, 3.0):
        guard.check(0.5, g)
    guard.check(math.inf, 1.0)
    clone = AnomalyGuard(min_history=2)
    clone.load_state_dict(guard.state_dict())
    assert clone.state_dict() == guard.state_dict()
    assert clone.reason(1.0, 100.0) == guard.reason(1.0, 100.0)
