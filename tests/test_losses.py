"""Tests for orion_mllm.losses: chunked KL/CE against full-logit references (values and gradients),
teacher isolation, memory that does not grow with the number of chunks (measured in subprocesses),
n == 0 edge cases, loss weighting, and the Liger backend on CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orion_mllm.kernels.chunked import ChunkedLinearKL
from orion_mllm.kernels.liger import _liger_probe_inputs, liger_available
from orion_mllm.kernels.reference import naive_kl_reference
from orion_mllm.losses import (
    LossTerms,
    LossWeights,
    TargetShares,
    cross_entropy_loss,
    kl_divergence_loss,
    mse_loss,
    response_weights,
    step_loss,
    step_metrics,
)
from orion_mllm.model.teacher import frozen_copy

SRC = Path(__file__).resolve().parents[1] / "src"


def make_kl_inputs(n=50, d=24, vocab=97, dtype=torch.float64, seed=0, scale=0.5):
    """Student/teacher hidden states and LM-head weights; student tensors require grad."""
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    sw = (torch.randn(vocab, d, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    th = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    tw = (torch.randn(vocab, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    return sh, sw, th, tw


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# --------------------------------------------------------------------------------------------------
# KL: values and gradients
# --------------------------------------------------------------------------------------------------

CHUNK_SIZES = [1, 7, 16, 50, 64, 1000]  # n = 50: non-dividing, dividing, == n, > n


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_chunked_kl_matches_reference_fp64(chunk_size):
    sh, sw, th, tw = make_kl_inputs()
    ref = naive_kl_reference(sh, sw, th, tw)
    got = kl_divergence_loss(sh, sw, th, tw, chunk_size=chunk_size, backend="chunked")
    assert got.dtype == torch.float64
    assert ref.item() > 0.1  # a meaningful, non-degenerate KL
    assert abs(got.item() - ref.item()) <= 1e-6
    assert abs(got.item() - ref.item()) <= 1e-12 * max(1.0, ref.item())  # it is in fact exact in fp64


@pytest.mark.parametrize("chunk_size", [3, 50, 128])
def test_chunked_kl_matches_reference_fp32_inputs(chunk_size):
    sh, sw, th, tw = make_kl_inputs(dtype=torch.float32)
    ref = naive_kl_reference(sh, sw, th, tw)  # same fp32 values, fp64 math
    got = kl_divergence_loss(sh, sw, th, tw, chunk_size=chunk_size, backend="chunked")
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    naive = kl_divergence_loss(sh, sw, th, tw, backend="naive")  # fp32 full-logit path
    assert naive.dtype == torch.float32
    assert naive.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 1000])
def test_chunked_kl_gradients_match_autograd_fp64(chunk_size):
    sh, sw, th, tw = make_kl_inputs()
    ref_gh, ref_gw = grads_of(naive_kl_reference(sh, sw, th, tw), sh, sw)
    gh, gw = grads_of(kl_divergence_loss(sh, sw, th, tw, chunk_size=chunk_size, backend="chunked"), sh, sw)
    assert gh.dtype == gw.dtype == torch.float64
    torch.testing.assert_close(gh, ref_gh, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-9, atol=1e-13)


def test_chunked_kl_gradients_fp32_inputs():
    sh, sw, th, tw = make_kl_inputs(dtype=torch.float32)
    ref_gh, ref_gw = grads_of(naive_kl_reference(sh, sw, th, tw), sh, sw)
    gh, gw = grads_of(kl_divergence_loss(sh, sw, th, tw, chunk_size=16, backend="chunked"), sh, sw)
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gh, ref_gh.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_kl_low_precision_inputs(dtype, monkeypatch):
    # A vocab tile smaller than V exercises the tiled fp32 upcast of low-precision weights.
    monkeypatch.setattr("orion_mllm.kernels.chunked._VOCAB_TILE", 40)
    sh, sw, th, tw = make_kl_inputs(dtype=dtype)
    ref = naive_kl_reference(sh, sw, th, tw)  # the same low-precision values, upcast to fp64
    ref_gh, ref_gw = grads_of(ref, sh, sw)
    got = kl_divergence_loss(sh, sw, th, tw, chunk_size=16, backend="chunked")
    assert got.dtype == torch.float32  # math in fp32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    gh, gw = grads_of(got, sh, sw)
    assert gh.dtype == gw.dtype == dtype  # grads come back in the input dtype
    # only the final rounding to bf16/fp16 (plus one per chunk for grad_W) separates them
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(gh.double(), ref_gh.double(), rtol=tol, atol=1e-4)
    torch.testing.assert_close(gw.double(), ref_gw.double(), rtol=tol, atol=1e-4)


def test_fp16_gradients_survive_loss_scaling():
    # Per-element gradients of a mean over many positions are tiny; fp16 loss scaling multiplies
    # them only through grad_output in backward, so they must not be rounded to fp16 before that.
    sh, sw, th, tw = make_kl_inputs(n=64, dtype=torch.float16, scale=0.01)
    ref_gh, ref_gw = grads_of(naive_kl_reference(sh, sw, th, tw) * 1024.0, sh, sw)
    gh, gw = grads_of(kl_divergence_loss(sh, sw, th, tw, chunk_size=8, backend="chunked") * 1024.0, sh, sw)
    assert gh.abs().max() > 0
    torch.testing.assert_close(gh.double(), ref_gh.double(), rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(gw.double(), ref_gw.double(), rtol=2e-3, atol=1e-6)


def test_grad_output_scaling_and_retain_graph():
    sh, sw, th, tw = make_kl_inputs()
    ref_gh, ref_gw = grads_of(naive_kl_reference(sh, sw, th, tw), sh, sw)
    loss = kl_divergence_loss(sh, sw, th, tw, chunk_size=16, backend="chunked")
    (0.25 * loss).backward(retain_graph=True)
    (0.75 * loss).backward()  # a second backward through the same graph must see the same grads
    torch.testing.assert_close(sh.grad, ref_gh, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(sw.grad, ref_gw, rtol=1e-9, atol=1e-13)
    # grad_output == 1 hands over the saved gradient without a copy; editing .grad in place (as
    # clipping does) must not corrupt what a second backward through the retained graph returns
    sh.grad = sw.grad = None
    loss = kl_divergence_loss(sh, sw, th, tw, chunk_size=16, backend="chunked")
    loss.backward(retain_graph=True)
    sh.grad.zero_()
    sw.grad.zero_()
    loss.backward()
    torch.testing.assert_close(sh.grad, ref_gh, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(sw.grad, ref_gw, rtol=1e-9, atol=1e-13)


def test_only_needed_gradients_are_computed():
    sh, sw, th, tw = make_kl_inputs()
    (gh,) = grads_of(kl_divergence_loss(sh, sw.detach(), th, tw, chunk_size=16), sh)
    ref_gh, _ = grads_of(naive_kl_reference(sh, sw, th, tw), sh, sw)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-9, atol=1e-13)
    with torch.no_grad():
        loss = kl_divergence_loss(sh, sw, th, tw, chunk_size=16)
    assert loss.grad_fn is None
    assert loss.item() == pytest.approx(naive_kl_reference(sh, sw, th, tw).item(), rel=1e-12)


@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_kl_zero_iff_student_equals_teacher(backend):
    sh, sw, th, tw = make_kl_inputs(dtype=torch.float32)
    sh_copy, sw_copy = sh.detach().clone(), sw.detach().clone()
    same = kl_divergence_loss(sh, sw, sh_copy, sw_copy, chunk_size=16, backend=backend)
    assert abs(same.item()) <= 1e-7
    gh, gw = grads_of(same, sh, sw)
    assert gh.abs().max() <= 1e-7 and gw.abs().max() <= 1e-7
    different = kl_divergence_loss(sh, sw, th, tw, chunk_size=16, backend=backend)
    assert different.item() > 1e-3
    # a small perturbation of the student only gives a small but still positive KL
    near = kl_divergence_loss(sh, sw, sh.detach(), (sw * 1.01).detach(), chunk_size=16, backend=backend)
    assert 0 < near.item() < 1e-2


def test_kl_is_forward_kl_teacher_to_student():
    """The direction matters: KL(teacher || student), not KL(student || teacher)."""
    sh, sw, th, tw = make_kl_inputs()
    with torch.no_grad():
        q = torch.softmax(th @ tw.T, -1)
        p = torch.softmax(sh @ sw.T, -1)
        forward = (q * (q.log() - p.log())).sum(-1).mean()
        reverse = (p * (p.log() - q.log())).sum(-1).mean()
    assert abs(forward.item() - reverse.item()) > 0.01
    got = kl_divergence_loss(sh, sw, th, tw, chunk_size=7, backend="chunked")
    assert got.item() == pytest.approx(forward.item(), rel=1e-10)


# --------------------------------------------------------------------------------------------------
# teacher isolation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_gradients_reach_only_the_student(backend):
    sh, sw, th, tw = make_kl_inputs()
    loss = kl_divergence_loss(sh, sw, th, tw, chunk_size=16, backend=backend)
    loss.backward()
    assert sh.grad is not None and sw.grad is not None
    assert not th.requires_grad and not tw.requires_grad
    assert th.grad is None and tw.grad is None
    # even a teacher tensor that (wrongly) requires grad gets none
    th2, tw2 = th.clone().requires_grad_(), tw.clone().requires_grad_()
    kl_divergence_loss(sh, sw, th2, tw2, chunk_size=16, backend=backend).backward()
    assert th2.grad is None and tw2.grad is None


def test_updating_the_student_leaves_the_teacher_unchanged():
    torch.manual_seed(0)
    student = torch.nn.Linear(24, 97, bias=False)  # an LM head
    teacher = frozen_copy(student)
    before = teacher.weight.detach().clone()
    opt = torch.optim.SGD(student.parameters(), lr=10.0)
    sh = torch.randn(40, 24, requires_grad=True)
    th = sh.detach() + 0.3 * torch.randn(40, 24)
    for _ in range(2):
        opt.zero_grad()
        loss = kl_divergence_loss(sh, student.weight, th, teacher.weight, chunk_size=16)
        loss.backward()
        opt.step()
    assert teacher.weight.grad is None
    assert not teacher.weight.requires_grad
    assert torch.equal(teacher.weight, before)
    assert not torch.equal(student.weight.detach(), before)


def test_frozen_copy_is_independent_frozen_and_in_eval_mode():
    torch.manual_seed(0)
    student = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4)
    )
    student.train()
    teacher = frozen_copy(student)
    assert teacher is not student
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    # the original is untouched: still trainable, still in train mode
    assert student.training and all(p.requires_grad for p in student.parameters())
    for (name, p_s), (_, p_t) in zip(student.named_parameters(), teacher.named_parameters(), strict=True):
        assert torch.equal(p_s, p_t), name
        assert p_s.data_ptr() != p_t.data_ptr(), name
    for b_s, b_t in zip(student.buffers(), teacher.buffers(), strict=True):
        assert b_s.data_ptr() != b_t.data_ptr()
    # changing the student afterwards (in place, or by training) does not change the teacher
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student(torch.randn(5, 8)).sum().backward()  # train-mode forward also updates BN running stats
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    # eval mode: deterministic (no dropout) and no gradient graph through the teacher's parameters
    x = torch.randn(5, 8)
    y1, y2 = teacher(x), teacher(x)
    assert torch.equal(y1, y2)
    assert not y1.requires_grad


# --------------------------------------------------------------------------------------------------
# memory: bounded by the chunk, not by the number of chunks
# --------------------------------------------------------------------------------------------------

# Peak RSS is read from /proc/self/status (VmHWM) after resetting it with /proc/self/clear_refs.
# resource.getrusage(RUSAGE_SELF).ru_maxrss is NOT usable here: Linux carries it over fork+exec, so
# a child started from this pytest process begins with pytest's own RSS (~350 MiB) as its "peak"
# and a transient smaller than that is invisible (measured: 99 MiB standalone, ~0 MiB under pytest).
_MEM_CHILD = textwrap.dedent(
    """
    import json, re, sys
    import torch
    from orion_mllm.losses import kl_divergence_loss

    def status_mib(field):
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\\s+(\\d+) kB", f.read(), re.M).group(1)) / 1024

    backend, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    n, chunk, vocab, d = map(int, sys.argv[3:7])
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    sw = (torch.randn(vocab, d, generator=g) * 0.1).to(dtype).requires_grad_()
    th = torch.randn(n, d, generator=g).to(dtype)
    tw = (torch.randn(vocab, d, generator=g) * 0.1).to(dtype)
    # warm-up on a tiny problem so one-off allocations (kernels, thread pools) are in the baseline
    kl_divergence_loss(sh[:2], sw[:64], th[:2], tw[:64], chunk_size=chunk, backend=backend).backward()
    sh.grad = sw.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status_mib("VmRSS")
    kl_divergence_loss(sh, sw, th, tw, chunk_size=chunk, backend=backend).backward()
    print(json.dumps({"transient_mib": status_mib("VmHWM") - before}))
    """
)


def _peak_transient_mib(backend: str, dtype: str, n: int, chunk: int, vocab: int, d: int) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    # Every allocation above 128 KiB gets its own mmap and goes back to the OS when freed, so
    # glibc's heap cannot hide (or fake) growth: the RSS peak tracks what was really live.
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    args = [backend, dtype, n, chunk, vocab, d]
    proc = subprocess.run(
        [sys.executable, "-c", _MEM_CHILD, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["transient_mib"]


@pytest.mark.skipif(
    not (os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)),
    reason="needs Linux /proc/self/clear_refs to reset the peak-RSS counter",
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16 also runs the tiled fp32 upcast
def test_peak_memory_does_not_grow_with_number_of_chunks(dtype):
    vocab, d, chunk = 32768, 64, 256  # one [chunk, V] fp32 buffer = 32 MiB; full logits at 8 chunks = 256 MiB
    chunked_1 = _peak_transient_mib("chunked", dtype, chunk, chunk, vocab, d)
    chunked_8 = _peak_transient_mib("chunked", dtype, 8 * chunk, chunk, vocab, d)
    msg = f"chunked: 1 chunk {chunked_1:.0f} MiB, 8 chunks {chunked_8:.0f} MiB"
    assert chunked_1 > 60, msg  # the measurement sees the two [chunk, V] buffers
    # 8x the positions adds only grad_hidden (n x d, <= 0.5 MiB). Anything like a [chunk, V] buffer
    # (32 MiB) surviving into the next chunk would show up here.
    assert chunked_8 - chunked_1 < 16, msg
    if dtype == "float32":
        # the naive path keeps several [n, V] tensors: it grows with n (by hundreds of MiB here)
        naive_8 = _peak_transient_mib("naive", dtype, 8 * chunk, chunk, vocab, d)
        msg += f"; naive: 8 chunks {naive_8:.0f} MiB"
        assert naive_8 > 4 * chunked_1 and naive_8 - chunked_8 > 500, msg


def _saved_tensors(fn) -> tuple[int, int]:
    """(number, total bytes) of tensors saved for backward while running ``fn``."""
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return len(sizes), sum(sizes)


def test_chunked_saves_a_constant_number_of_tensors():
    d, vocab, chunk = 16, 512, 32
    counts = {}
    for n in (chunk, 8 * chunk):
        sh, sw, th, tw = make_kl_inputs(n=n, d=d, vocab=vocab, dtype=torch.float32)
        count, nbytes = _saved_tensors(lambda: ChunkedLinearKL.apply(sh, sw, th, tw, chunk))  # noqa: B023
        # grad_hidden [n, d] and grad_weight [V, d]: nothing of size n x V
        assert count == 2
        assert nbytes == (n * d + vocab * d) * 4
        _, naive_bytes = _saved_tensors(lambda: naive_kl_reference(sh, sw, th, tw))  # noqa: B023
        assert naive_bytes >= 2 * n * vocab * 8  # the reference keeps full [n, V] tensors
        counts[n] = count
    assert counts[chunk] == counts[8 * chunk]


# --------------------------------------------------------------------------------------------------
# CE, MSE, n == 0
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 7, 50, 1000])
def test_chunked_ce_matches_full_logits(dtype, chunk_size):
    sh, sw, _, _ = make_kl_inputs(dtype=dtype)
    targets = torch.randint(0, sw.shape[0], (sh.shape[0],))
    ref = F.cross_entropy(sh.double() @ sw.double().T, targets)
    ref_gh, ref_gw = grads_of(ref, sh, sw)
    got = cross_entropy_loss(sh, sw, targets, chunk_size=chunk_size)
    gh, gw = grads_of(got, sh, sw)
    if dtype == torch.float64:
        assert got.item() == pytest.approx(ref.item(), rel=1e-12)
        torch.testing.assert_close(gh, ref_gh, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(gw, ref_gw, rtol=1e-9, atol=1e-13)
    else:
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(gh, ref_gh.float(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gw, ref_gw.float(), rtol=1e-4, atol=1e-6)
        # and against plain fp32 F.cross_entropy, as the model would compute it
        plain = F.cross_entropy(sh @ sw.T, targets)
        assert got.item() == pytest.approx(plain.item(), rel=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_weighted_ce_is_the_weighted_mean_of_full_logit_ce(chunk_size):
    sh, sw, _, _ = make_kl_inputs(dtype=torch.float64)
    n = sh.shape[0]
    targets = torch.randint(0, sw.shape[0], (n,))
    w = torch.rand(n, dtype=torch.float64) + 0.1
    per_row = F.cross_entropy(sh @ sw.T, targets, reduction="none")
    ref = (w * per_row).sum() / w.sum()
    ref_gh, ref_gw = grads_of(ref, sh, sw)
    got = cross_entropy_loss(sh, sw, targets, chunk_size=chunk_size, row_weights=w)
    gh, gw = grads_of(got, sh, sw)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-6, atol=1e-10)
    # Equal weights are the plain mean; bad weights are refused.
    plain = cross_entropy_loss(sh, sw, targets, row_weights=torch.full((n,), 3.0, dtype=torch.float64))
    assert plain.item() == pytest.approx(F.cross_entropy(sh @ sw.T, targets).item(), rel=1e-9)
    with pytest.raises(ValueError, match="row_weights must have shape"):
        cross_entropy_loss(sh, sw, targets, row_weights=w[:-1])
    with pytest.raises(ValueError, match="finite, >= 0 and not all zero"):
        cross_entropy_loss(sh, sw, targets, row_weights=torch.zeros(n))


def test_response_weights_square_averaging():
    """Runs of consecutive targets are responses (turns and packed samples are split by prompt
    positions); ``square`` weighs each target 1/sqrt(its response's length), row-major."""
    valid = torch.tensor([
        [0, 1, 1, 1, 1, 0, 0, 1],  # a 4-token answer, then a 1-token one running to the row's end
        [1, 1, 0, 1, 1, 1, 1, 1],  # a 2-token response opening the row, then a 5-token one
    ], dtype=torch.bool)  # fmt: skip
    got = response_weights(valid, "square")
    want = [0.5] * 4 + [1.0] + [2**-0.5] * 2 + [5**-0.5] * 5
    torch.testing.assert_close(got, torch.tensor(want))
    assert torch.equal(response_weights(valid, "token"), torch.ones(12))
    assert response_weights(torch.zeros(2, 3, dtype=torch.bool)).numel() == 0
    with pytest.raises(ValueError, match="choose one of token, square"):
        response_weights(valid, "sample")


def test_ce_rejects_bad_targets():
    sh, sw, _, _ = make_kl_inputs(n=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        cross_entropy_loss(sh, sw, torch.tensor([0, 1, -100, 2]))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        cross_entropy_loss(sh, sw, torch.tensor([0, 1, 97, 2]))
    with pytest.raises(TypeError, match="long"):
        cross_entropy_loss(sh, sw, torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="one id per position"):
        cross_entropy_loss(sh, sw, torch.tensor([0, 1, 2]))


def test_empty_inputs_give_zero_loss_that_backprops():
    d, vocab = 8, 33
    sh = torch.zeros(0, d, requires_grad=True)
    sw = torch.randn(vocab, d, requires_grad=True)
    cases = {
        "kl_chunked": lambda: kl_divergence_loss(sh, sw, sh.detach(), sw.detach(), backend="chunked"),
        "kl_naive": lambda: kl_divergence_loss(sh, sw, sh.detach(), sw.detach(), backend="naive"),
        "kl_auto": lambda: kl_divergence_loss(sh, sw, sh.detach(), sw.detach()),
        "ce": lambda: cross_entropy_loss(sh, sw, torch.zeros(0, dtype=torch.long)),
    }
    for name, fn in cases.items():
        sh.grad = sw.grad = None
        loss = fn()
        assert loss.shape == () and loss.item() == 0.0, name
        loss.backward()
        assert sh.grad is not None and sh.grad.shape == (0, d), name
        assert sw.grad is not None and torch.equal(sw.grad, torch.zeros_like(sw)), name
    pred = torch.zeros(0, 5, requires_grad=True)
    loss = mse_loss(pred, torch.zeros(0, 5))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert pred.grad is not None and pred.grad.shape == (0, 5)


def test_mse_loss():
    pred = torch.randn(6, 10, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(6, 10, dtype=torch.bfloat16)
    loss = mse_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(((pred.float() - target.float()) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert pred.grad.dtype == torch.bfloat16
    p64 = torch.randn(3, 4, dtype=torch.float64)
    assert mse_loss(p64, p64 * 0).item() == pytest.approx((p64**2).mean().item(), rel=1e-15)
    with pytest.raises(ValueError, match="shapes differ"):
        mse_loss(torch.zeros(4, 3), torch.zeros(3))


# --------------------------------------------------------------------------------------------------
# argument checks and backends
# --------------------------------------------------------------------------------------------------


def test_kl_argument_checks():
    sh, sw, th, tw = make_kl_inputs(n=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        kl_divergence_loss(sh, sw, th, tw, backend="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        kl_divergence_loss(sh, sw, th, tw, chunk_size=0)
    with pytest.raises(ValueError, match="gather the positions"):
        kl_divergence_loss(sh[None], sw, th[None], tw)
    with pytest.raises(ValueError, match="same positions"):
        kl_divergence_loss(sh, sw, th[:4], tw)
    with pytest.raises(ValueError, match="vocabularies"):
        kl_divergence_loss(sh, sw, th, tw[:-1])
    with pytest.raises(ValueError, match="hidden size"):
        kl_divergence_loss(sh, sw[:, :-1], th, tw)


def test_auto_backend_on_cpu_is_chunked():
    sh, sw, th, tw = make_kl_inputs(dtype=torch.float32)
    auto = kl_divergence_loss(sh, sw, th, tw, chunk_size=16)
    chunked = kl_divergence_loss(sh, sw, th, tw, chunk_size=16, backend="chunked")
    assert torch.equal(auto, chunked)
    assert auto.grad_fn is not None and "ChunkedLinearKL" in type(auto.grad_fn).__name__


def test_liger_backend_refuses_cpu_tensors_clearly():
    sh, sw, th, tw = make_kl_inputs(n=5, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="liger"):
        kl_divergence_loss(sh, sw, th, tw, backend="liger")


def test_liger_probe_tells_forward_from_reverse_kl():
    """The probe that picks Liger's beta must separate KL(t||s) from KL(s||t) by far more than its
    1% tolerance, or a wrong-direction Liger could pass it."""
    sh, sw, th, tw = _liger_probe_inputs()
    forward = naive_kl_reference(sh, sw, th, tw).item()
    reverse = naive_kl_reference(th, tw, sh, sw).item()
    assert abs(forward - reverse) / forward > 0.1


# --------------------------------------------------------------------------------------------------
# weights and terms
# --------------------------------------------------------------------------------------------------


def test_loss_weights_parse_and_validate():
    w = LossWeights.parse("1:1:0.01")
    assert (w.ce, w.mse, w.kl) == (1.0, 1.0, 0.01)
    assert LossWeights.parse(" 0 : 2 : 1e-3 ") == LossWeights(0.0, 2.0, 0.001)
    assert str(LossWeights.parse(str(w))) == str(w) and LossWeights.parse(str(w)) == w
    assert isinstance(LossWeights(1, 0, 0).ce, float)
    with pytest.raises(ValueError, match=r"'abc'"):
        LossWeights.parse("1:abc:0.01")
    with pytest.raises(ValueError, match="mse"):
        LossWeights.parse("1:abc:0.01")
    with pytest.raises(ValueError, match="three numbers"):
        LossWeights.parse("1:1")
    with pytest.raises(ValueError, match="three numbers"):
        LossWeights.parse("1:1:0.01:2")
    with pytest.raises(ValueError, match=r"kl must be >= 0, got -0\.1"):
        LossWeights.parse("1:1:-0.1")
    with pytest.raises(ValueError, match="ce must be finite"):
        LossWeights.parse("inf:1:1")
    with pytest.raises(ValueError, match="mse must be finite"):
        LossWeights(1.0, math.nan, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        LossWeights.parse("0:0:0")
    with pytest.raises(TypeError, match="number"):
        LossWeights(1.0, "1", 0.0)
    with pytest.raises(TypeError, match="number"):
        LossWeights(True, 1.0, 0.0)
    with pytest.raises(AttributeError):
        w.ce = 2.0  # frozen


def test_step_loss_weights_terms_by_their_share_and_logs_the_parts():
    ce, mse, kl = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0), torch.tensor(5.0)
    terms = LossTerms(ce=ce, mse=mse, kl=kl)
    w = LossWeights(1.0, 0.5, 0.01)
    whole = step_loss(terms, w)  # a step of one batch: every share is 1
    assert whole.loss.item() == pytest.approx(2.0 + 1.5 + 0.05)
    whole.loss.backward()
    assert ce.grad.item() == 1.0
    assert whole.parts == (2.0, 3.0, 5.0)
    assert step_metrics(whole.parts, w) == {"loss": pytest.approx(3.55), "ce": 2.0, "mse": 3.0, "kl": 5.0}
    assert terms.as_floats() == {"ce": 2.0, "mse": 3.0, "kl": 5.0}
    # 1 of the step's 4 text targets and 2 of its 4 visual ones, on one of 2 ranks (FSDP averages)
    part = step_loss(terms, w, TargetShares.of(1, 2, 4, 4, world_size=2))
    assert part.loss.item() == pytest.approx(2 * (2.0 * 0.25 + 0.5 * 3.0 * 0.5 + 0.01 * 5.0 * 0.5))
    assert part.parts == (0.5, 1.5, 2.5)
    assert TargetShares.of(0, 3, 0, 6) == TargetShares(text=0.0, visual=0.5)  # no text in the step
    # a dummy micro-batch stays in the graph (zero gradients) and counts 0
    ce.grad = None
    dummy = step_loss(terms, w, TargetShares(dummy=True))
    dummy.loss.backward()
    assert dummy.loss.item() == 0.0 and ce.grad.item() == 0.0 and dummy.parts == (0.0, 0.0, 0.0)
    # weight 0 skips the term, even when it was not computed or is not finite
    partial = LossTerms(ce=ce, mse=None, kl=torch.tensor(math.nan))
    ce_only = LossWeights(2.0, 0.0, 0.0)
    assert step_loss(partial, ce_only).loss.item() == 4.0
    logged = step_metrics(step_loss(partial, ce_only).parts, ce_only)
    assert logged == {"loss": 4.0, "ce": 2.0, "mse": None, "kl": None}
    assert math.isnan(step_metrics((math.nan, 1.0, 0.0), w)["loss"])
    assert LossTerms(ce=ce).as_floats() == {"ce": 2.0}
    with pytest.raises(ValueError, match="'kl'"):
        step_loss(LossTerms(ce=ce, mse=mse), LossWeights.parse("1:1:0.01"))
    with pytest.raises(ValueError, match="scalar"):
        step_loss(LossTerms(ce=torch.ones(2)), LossWeights(1.0, 0.0, 0.0))


# --------------------------------------------------------------------------------------------------
# CUDA / Liger
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunked_kl_on_cuda_matches_cpu():
    sh, sw, th, tw = make_kl_inputs(n=300, d=64, vocab=5000, dtype=torch.float32)
    ref = naive_kl_reference(sh, sw, th, tw)
    ref_gh, ref_gw = grads_of(ref, sh, sw)
    cuda = [t.detach().cuda().requires_grad_(t.requires_grad) for t in (sh, sw, th, tw)]
    got = kl_divergence_loss(*cuda, chunk_size=128, backend="chunked")
    gh, gw = grads_of(got, cuda[0], cuda[1])
    # loose enough for TF32 matmuls if the user enabled them
    assert got.item() == pytest.approx(ref.item(), rel=1e-2)
    torch.testing.assert_close(gh.cpu().double(), ref_gh.double(), rtol=5e-2, atol=1e-4)
    torch.testing.assert_close(gw.cpu().double(), ref_gw.double(), rtol=5e-2, atol=1e-4)


def test_chunked_losses_ignore_an_enclosing_autocast():
    """bf16 training runs the model under autocast; the chunked losses must keep their fp32 math."""
    sh, sw, th, tw = make_kl_inputs(n=40, d=32, vocab=300, dtype=torch.float32)
    ref = kl_divergence_loss(sh, sw, th, tw, chunk_size=16, backend="chunked")
    ref_gh, ref_gw = grads_of(ref, sh, sw)
    sh2, sw2 = (t.detach().clone().requires_grad_(True) for t in (sh, sw))
    targets = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kl_divergence_loss(sh2, sw2, th, tw, chunk_size=16, backend="chunked")
        ce = cross_entropy_loss(sh2, sw2, targets, chunk_size=16)
    assert got.dtype == torch.float32 and ce.dtype == torch.float32
    gh, gw = grads_of(got, sh2, sw2)
    assert got.item() == ref.item()
    torch.testing.assert_close(gh, ref_gh)
    torch.testing.assert_close(gw, ref_gw)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and liger_available()), reason="needs CUDA and liger_kernel"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_matches_chunked(dtype):
    n, d, vocab = 600, 256, 32000
    sh, sw, th, tw = (
        t.detach().cuda().requires_grad_(t.requires_grad)
        for t in make_kl_inputs(n=n, d=d, vocab=vocab, dtype=dtype, scale=0.1)
    )
    ref = kl_divergence_loss(sh, sw, th, tw, chunk_size=256, backend="chunked")
    ref_gh, ref_gw = grads_of(ref, sh, sw)
    got = kl_divergence_loss(sh, sw, th, tw, chunk_size=256, backend="liger")
    gh, gw = grads_of(got, sh, sw)
    auto = kl_divergence_loss(sh, sw, th, tw, chunk_size=256)  # auto picks liger on CUDA
    assert auto.item() == pytest.approx(got.item(), rel=1e-6)
    assert th.grad is None and tw.grad is None
    # Liger computes the distillation term in the input dtype; bf16 is far looser than fp32
    rel = 1e-3 if dtype == torch.float32 else 5e-2
    assert got.item() == pytest.approx(ref.item(), rel=rel)
    gtol = 1e-2 if dtype == torch.float32 else 1e-1
    scale_h, scale_w = ref_gh.float().abs().max(), ref_gw.float().abs().max()
    assert (gh.float() - ref_gh.float()).abs().max() <= gtol * scale_h
    assert (gw.float() - ref_gw.float()).abs().max() <= gtol * scale_w
