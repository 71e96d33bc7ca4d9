"""N·V > 2³¹ elements on the CPU: bfloat16 logits of 16385 × 131072 (4.3 GB).

16384 × 131072 = 2³¹ exactly, so the last row lies wholly past the 2³¹-th element: any 32-bit
element offset shows there. The logits are built cheaply — a small random block of rows copied
over the whole tensor, then a distinct last row — and every row is checked against the float64
oracle on that row alone (which needs no big reference). Peak memory beyond the input is measured
with ``crossent.measure.peak_extra_rss`` (the process's resident high-water mark).

``bigmem``: run it outside parallel test workers (``pytest -m bigmem``; ``make test`` runs one
process). It skips, saying so, when the machine has less than 12 GiB of memory available.
"""

from __future__ import annotations

import pytest
import torch

import crossent
from crossent import reference as R
from crossent.measure import peak_extra_rss
from helpers.cross_entropy import torch_at_dtype
from judge import assert_close_to_reference

pytestmark = pytest.mark.bigmem

N, V = 16385, 131072
BLOCK = 5  # 16384 = 5 · 3276 + 4: the pattern rows, then a distinct last row
NEEDED_GIB = 12
EXTRA_LIMIT = 2 * 2**30  # ~2 GB beyond the input
bf16, f64 = torch.bfloat16, torch.float64


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


@pytest.fixture(scope="module")
def problem():
    available = _available_gib()
    if available < NEEDED_GIB:
        pytest.skip(
            f"needs {NEEDED_GIB} GiB of available memory (bf16 {N}×{V} logits are 4.3 GB, plus up to 2 GB of "
            f"work and the check's margin); this machine has {available:.1f} GiB available"
        )
    g = torch.Generator().manual_seed(8)
    block = (torch.randn(BLOCK, V, generator=g) * 3).to(bf16)
    block_target = torch.randint(0, V, (BLOCK,), generator=g)
    block_target[2] = -100  # an ignored row in every block
    last = (torch.randn(V, generator=g) * 2).to(bf16)
    last_target = V - 7  # a class near the end of the row, far past element 2³¹
    last[last_target - 3] = 30.0  # a spike beside it: a confident, wrong prediction

    logits = torch.empty(N, V, dtype=bf16)
    full = (N - 1) // BLOCK * BLOCK
    logits[:full].view(-1, BLOCK, V).copy_(block.expand(full // BLOCK, BLOCK, V))
    logits[full : N - 1].copy_(block[: N - 1 - full])
    logits[N - 1].copy_(last)
    target = block_target.repeat(N // BLOCK + 1)[:N].clone()
    target[N - 1] = last_target
    rows = {"block": (block, block_target), "last": (last.unsqueeze(0), torch.tensor([last_target]))}
    return logits, target, rows


def _row_reference(x, t, reduction):
    """The oracle, and PyTorch at bf16, on a few rows alone: (ref loss, ref grad, torch loss, torch grad)."""
    xr = x.to(f64).requires_grad_()
    ref = R.cross_entropy(xr, t, reduction=reduction)
    ref.sum().backward()
    xb = x.clone().requires_grad_()
    base, _ = torch_at_dtype(xb, t, None, reduction=reduction)
    base.sum().backward()
    return ref.detach(), xr.grad, base.detach(), xb.grad


def test_bf16_16385_by_131072(problem):
    """Forward, then forward + backward with ``inplace_backward=True`` (which consumes the
    logits, so it comes last): every row right, the last one included, within ~2 GB beyond the
    input. One test, so that parallel workers cannot hold two copies of the input at once."""
    logits, target, rows = problem
    assert logits.numel() > 2**31
    full = (N - 1) // BLOCK * BLOCK
    kept = target != -100

    # --- forward alone
    loss, extra = peak_extra_rss(lambda: crossent.cross_entropy(logits, target, reduction="none"))
    assert loss.shape == (N,) and loss.dtype == torch.float32
    assert extra <= EXTRA_LIMIT, f"forward held {extra / 2**30:.2f} GiB beyond the input"
    last_ref, last_ref_grad, last_base, last_base_grad = _row_reference(*rows["last"], "sum")
    assert_close_to_reference("last row loss", loss[-1:], last_ref.view(1), last_base.view(1), bf16)
    ref, _, base, _ = _row_reference(*rows["block"], "none")
    pattern = loss[:full].view(-1, BLOCK)
    assert_close_to_reference("every pattern row", pattern, ref.expand_as(pattern), base.expand_as(pattern), bf16)
    assert_close_to_reference(
        "the rows before the last", loss[full:-1], ref[: N - 1 - full], base[: N - 1 - full], bf16
    )

    mean = crossent.cross_entropy(logits, target)  # "mean" over the kept tokens
    exact = (ref.sum() * (full // BLOCK) + ref[: N - 1 - full].sum() + last_ref) / kept.sum().to(f64)
    assert_close_to_reference("mean", mean, exact, None, bf16)

    # --- forward + backward, the gradient written over the logits
    x = logits.requires_grad_()
    storage = x.data_ptr()

    def step():
        loss = crossent.cross_entropy(x, target, inplace_backward=True)  # "mean"
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    (mean_again, grad), extra = peak_extra_rss(step)
    logits.requires_grad_(False)
    assert grad.data_ptr() == storage, "inplace_backward=True must write the gradient into the logits"
    assert extra <= EXTRA_LIMIT, f"forward + backward held {extra / 2**30:.2f} GiB beyond the input"
    assert torch.equal(mean_again, mean)
    n_kept = int(kept.sum())  # d mean / d ℓ_i = 1 / n_kept: compare the rows' own gradients
    assert_close_to_reference("last row gradient", grad[-1:].to(f64) * n_kept, last_ref_grad, last_base_grad, bf16)
    _, block_ref_grad, _, block_base_grad = _row_reference(*rows["block"], "sum")
    assert_close_to_reference(
        "first rows' gradient", grad[:BLOCK].to(f64) * n_kept, block_ref_grad, block_base_grad, bf16
    )
    assert_close_to_reference(
        "rows before the last: gradient",
        grad[full:-1].to(f64) * n_kept,
        block_ref_grad[: N - 1 - full],
        block_base_grad[: N - 1 - full],
        bf16,
    )
    assert torch.count_nonzero(grad[2::BLOCK]) == 0, "ignored rows get exactly 0"
