"""crossent.linear_cross_entropy, LinearCrossEntropyLoss and LinearCrossEntropyHead, on every backend.

Judged against the float64 oracle ``crossent.reference.linear_cross_entropy`` with the tolerance
rule of DESIGN.md §6 (tests/judge.py): the loss and the gradients of hidden, weight and bias must
be no further from the oracle than twice the composed PyTorch expression computed at the input
dtype (``F.cross_entropy`` of ``hidden @ W.T + b``, scaled and capped, plus the z-loss), plus the
slack. Every expected value comes from the oracle or from plain PyTorch, never from crossent.

Tests about the loss take ``impl``: the PyTorch backend, and the Triton backend on CPU tensors
under the Triton interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``). The interpreter runs
every program of a launch one after the other in Python (about 10 ms each), so the cost is
tokens × chunks × passes: Triton gets its own grid and subsets, at tiny sizes
(:func:`helpers.common.per_backend`). How the Triton kernels are built and dispatched is tested in
tests/test_triton_linear_build.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import reference as R
from helpers import internals
from helpers.common import BACKENDS, bf16, f16, f32, f64, gen, needs_triton, per_backend
from helpers.linear import (
    ALL,
    BT,
    Case,
    compile_inputs,
    eager_and_compiled,
    grads,
    make_inputs,
    make_upstream,
    run_case,
    run_reference,
    run_torch,
    torch_at_dtype,
)
from judge import SLACK, assert_close_to_reference, rel_error

# --------------------------------------------------------------------------------------------
# The grids (DESIGN.md §6: chosen, not crossed)
# --------------------------------------------------------------------------------------------

#: The PyTorch backend's grid.
GRID = [
    # --- each option alone (float32)
    Case("plain-mean-unit", upstream="unit"),
    Case("alone-bias-sum", bias=True, reduction="sum"),
    Case("alone-class-weight-mean", class_weight="rand", schedule="vocab"),
    Case("alone-eps-none", eps=0.2, reduction="none"),
    Case("alone-zloss-mean", z_loss=1e-2, schedule="token"),
    Case("alone-softcap-sum", softcap=2.0, reduction="sum", schedule="vocab"),
    Case("alone-scale-none", scale=0.5, reduction="none", schedule="vocab"),
    Case("alone-negative-scale-mean", scale=-1.5),
    Case("alone-ignore-mean", ignore=0.3),
    Case("alone-ignore-real-class-sum", ignore=0.3, ignore_index=3, reduction="sum", schedule="vocab"),
    Case("alone-ignore-real-class-none", ignore=0.3, ignore_index=0, reduction="none"),
    # --- every dtype meets every reduction and both schedules; all options combined, with LossAux
    Case("all-f32-mean-token", schedule="token", ignore=0.2, aux=True, **ALL),
    Case("all-f32-sum-vocab-chunk7", schedule="vocab", chunk=7, ignore=0.2, aux=True, **ALL),
    Case("all-f32-none-auto-ii3", reduction="none", ignore=0.2, ignore_index=3, aux=True, **ALL),
    Case("all-bf16-mean-vocab", dtype=bf16, schedule="vocab", ignore=0.2, aux=True, **ALL),
    Case("all-bf16-sum-token-chunk7", dtype=bf16, reduction="sum", schedule="token", chunk=7, aux=True, **ALL),
    Case("all-bf16-none-auto", dtype=bf16, reduction="none", ignore=0.2, aux=True, **ALL),
    Case("all-f64-mean-auto-chunk1", dtype=f64, chunk=1, ignore=0.2, aux=True, **ALL),
    Case("all-f64-sum-token", dtype=f64, reduction="sum", schedule="token", aux=True, **ALL),
    Case(
        "all-f64-none-vocab-ii0",
        dtype=f64,
        reduction="none",
        schedule="vocab",
        ignore=0.2,
        ignore_index=0,
        aux=True,
        **ALL,
    ),
    Case("bf16-mean-plain", dtype=bf16),
    Case("f16-mean-token-all", dtype=torch.float16, schedule="token", ignore=0.2, aux=True, **ALL),
    Case("bf16-sum-bias-vocab", dtype=bf16, reduction="sum", bias=True, schedule="vocab"),
    Case("bf16-none-zloss-token", dtype=bf16, reduction="none", z_loss=1e-2, schedule="token"),
    Case("f64-mean-softcap-vocab", dtype=f64, softcap=2.0, schedule="vocab"),
    # --- shift on (B, T, D): "none" keeps the (B, T) shape with the last `shift` positions 0
    Case("shift1-f32-none-token", lead=BT, shift=1, reduction="none", schedule="token", bias=True, aux=True),
    Case("shift1-f32-mean-vocab-ignore", lead=BT, shift=1, schedule="vocab", ignore=0.2, z_loss=1e-3),
    Case("shift2-f32-none-vocab-all", lead=BT, shift=2, reduction="none", schedule="vocab", chunk=7, aux=True, **ALL),
    Case("shift2-bf16-mean-token", lead=BT, shift=2, dtype=bf16, schedule="token", bias=True, eps=0.1),
    Case(
        "shift1-bf16-none-auto-ignore", lead=BT, shift=1, dtype=bf16, reduction="none", ignore=0.2, class_weight="rand"
    ),
    Case(
        "shift2-f64-sum-token-all",
        lead=BT,
        shift=2,
        dtype=f64,
        reduction="sum",
        schedule="token",
        chunk=1,
        aux=True,
        **ALL,
    ),
    Case("shift4-f32-sum-BT", lead=(2, 4), shift=4, reduction="sum"),  # shift >= T: nothing kept
    Case("shift1-f32-none-4d-all", lead=(2, 2, 4), shift=1, reduction="none", ignore=0.2, aux=True, **ALL),
    # --- non-contiguous hidden, weight (a transposed (D, V) matrix) and bias
    Case("strided-f32-mean-token-BT", lead=BT, layout="strided", schedule="token", bias=True, class_weight="rand"),
    Case(
        "strided-bf16-none-vocab",
        layout="strided",
        dtype=bf16,
        reduction="none",
        schedule="vocab",
        chunk=7,
        bias=True,
        eps=0.1,
    ),
    Case("strided-f64-sum-shift1", lead=BT, layout="strided", dtype=f64, reduction="sum", shift=1, bias=True),
    # --- odd D and V, and one larger vocabulary with few tokens
    Case("D1-V2-f32-sum", D=1, V=2, reduction="sum", bias=True),
    Case("V1-f32-none-eps-zloss", V=1, reduction="none", eps=0.1, z_loss=1e-2, bias=True),
    Case("V32003-f32-mean-token-all", lead=(6,), D=64, V=32003, schedule="token", ignore=0.2, aux=True, **ALL),
    Case(
        "V32003-bf16-sum-vocab",
        lead=(2, 3),
        D=64,
        V=32003,
        dtype=bf16,
        reduction="sum",
        schedule="vocab",
        bias=True,
        z_loss=1e-4,
        shift=1,
    ),
    Case(
        "V32003-f32-none-vocab-chunk5000",
        lead=(5,),
        D=64,
        V=32003,
        reduction="none",
        schedule="vocab",
        chunk=5000,
        class_weight="rand",
        softcap=3.0,
    ),
    # --- everything ignored, and a zero "mean" denominator from class weights
    Case("ignore-all-f32-mean-token", ignore=1.0, bias=True, z_loss=1e-3, schedule="token", aux=True),
    Case("ignore-all-f32-mean-vocab", ignore=1.0, bias=True, eps=0.1, schedule="vocab"),
    Case("ignore-all-bf16-sum-token", ignore=1.0, dtype=bf16, reduction="sum", schedule="token", bias=True),
    Case(
        "ignore-all-f64-none-vocab-ii0",
        ignore=1.0,
        ignore_index=0,
        dtype=f64,
        reduction="none",
        schedule="vocab",
        bias=True,
        aux=True,
    ),
    Case("ignore-all-bf16-mean-shift1-aux", lead=BT, shift=1, ignore=1.0, dtype=bf16, aux=True, bias=True),
    Case(
        "zero-kept-f32-mean-token",
        class_weight="zero_kept",
        ignore=0.2,
        eps=0.1,
        z_loss=1e-3,
        bias=True,
        schedule="token",
        aux=True,
    ),
    Case("zero-kept-f32-mean-vocab", class_weight="zero_kept", bias=True, schedule="vocab"),
]

#: The Triton backend's grid, pairwise too, at the interpreter's tiny sizes (float64 goes to the
#: PyTorch backend): every dtype meets every reduction and both schedules with every option on;
#: each option alone; shift; all ignored; zero denominators; strides; V and D odd, tiny, and above
#: one kernel block. "vocab" chunks of 160 make two blocks of V = 301 (the second narrower);
#: "token" chunks of 5 make three chunks of 13 tokens.
V4K = dict(lead=(6,), D=32, V=4100)
TRITON_GRID = [
    Case("f32-mean-token-all", schedule="token", chunk=5, ignore=0.2, aux=True, **ALL),
    Case("f32-sum-vocab-all", schedule="vocab", chunk=160, reduction="sum", ignore=0.2, aux=True, **ALL),
    Case("f32-none-token-all-ii3", schedule="token", reduction="none", ignore=0.2, ignore_index=3, aux=True, **ALL),
    Case("f32-none-vocab-all", schedule="vocab", chunk=160, reduction="none", ignore=0.2, aux=True, **ALL),
    Case("bf16-mean-vocab-all", dtype=bf16, schedule="vocab", chunk=160, ignore=0.2, aux=True, **ALL),
    Case("bf16-sum-token-all", dtype=bf16, schedule="token", chunk=5, reduction="sum", aux=True, **ALL),
    Case("bf16-none-token-all", dtype=bf16, schedule="token", reduction="none", ignore=0.2, **ALL),
    Case("bf16-none-vocab-plain", dtype=bf16, schedule="vocab", reduction="none"),
    Case("f16-mean-token-all", dtype=f16, schedule="token", ignore=0.2, aux=True, **ALL),
    Case("f16-sum-vocab-bias", dtype=f16, schedule="vocab", chunk=160, reduction="sum", bias=True),
    Case("f16-none-vocab-all", dtype=f16, schedule="vocab", reduction="none", ignore=0.2, **ALL),
    Case("bf16-mean-auto-plain", dtype=bf16, upstream="unit"),
    # each option alone
    Case("alone-bias-sum-token", bias=True, reduction="sum", schedule="token"),
    Case("alone-class-weight-mean-vocab", class_weight="rand", schedule="vocab"),
    Case("alone-eps-none-token", eps=0.2, reduction="none", schedule="token"),
    Case("alone-zloss-mean-vocab", z_loss=1e-2, schedule="vocab"),
    Case("alone-softcap-sum-vocab", softcap=2.0, reduction="sum", schedule="vocab"),
    Case("alone-scale-none-vocab", scale=0.5, reduction="none", schedule="vocab"),
    Case("alone-negative-scale-mean-token", scale=-1.5, schedule="token"),
    Case("alone-ignore-real-class-sum-vocab", ignore=0.3, ignore_index=3, reduction="sum", schedule="vocab"),
    # shift on (B, T, D)
    Case("shift1-f32-none-token", lead=BT, shift=1, reduction="none", schedule="token", chunk=4, bias=True, aux=True),
    Case("shift2-f32-mean-vocab-all", lead=BT, shift=2, schedule="vocab", ignore=0.2, aux=True, **ALL),
    Case(
        "shift1-bf16-sum-token-cw", lead=BT, shift=1, dtype=bf16, reduction="sum", schedule="token", class_weight="rand"
    ),
    # everything ignored, and a zero "mean" denominator from class weights
    Case("ignore-all-f32-mean-token", ignore=1.0, bias=True, z_loss=1e-3, schedule="token", aux=True),
    Case("ignore-all-bf16-sum-vocab", ignore=1.0, dtype=bf16, reduction="sum", schedule="vocab", bias=True, eps=0.1),
    Case("ignore-all-f16-none-vocab-ii0", ignore=1.0, ignore_index=0, dtype=f16, reduction="none", schedule="vocab"),
    Case("zero-kept-f32-mean-token", class_weight="zero_kept", ignore=0.2, eps=0.1, schedule="token", aux=True),
    Case("zero-kept-bf16-mean-vocab", class_weight="zero_kept", dtype=bf16, bias=True, schedule="vocab"),
    # non-contiguous hidden, weight (a transposed (D, V) matrix) and bias
    Case("strided-f32-mean-token", lead=BT, layout="strided", schedule="token", chunk=4, bias=True, eps=0.1),
    Case(
        "strided-bf16-none-vocab",
        layout="strided",
        dtype=bf16,
        reduction="none",
        schedule="vocab",
        chunk=160,
        bias=True,
    ),
    # tiny and large vocabularies
    Case("D1-V2-f32-sum-token", D=1, V=2, reduction="sum", bias=True, schedule="token"),
    Case("V1-f32-none-vocab", V=1, reduction="none", eps=0.1, z_loss=1e-2, bias=True, schedule="vocab"),
    Case("V4100-f32-mean-token-all", schedule="token", ignore=0.2, aux=True, **V4K, **ALL),
    Case(
        "V4100-bf16-sum-vocab-chunk1500",
        schedule="vocab",
        chunk=1500,
        dtype=bf16,
        reduction="sum",
        bias=True,
        z_loss=1e-4,
        **V4K,
    ),
]

GRIDS = {"torch": GRID, "triton": TRITON_GRID}


@pytest.mark.parametrize("impl, case", per_backend(GRIDS))
def test_grid_against_reference(impl, case: Case):
    run_case(case, impl)


def _torch_grid_covers_what_the_issue_asks(grid):
    """The PyTorch grid: every dtype × reduction × schedule, each option alone, shifts, V > 32000."""
    ids = {c.id for c in grid}
    assert len(ids) == len(grid)
    for dtype in (f32, bf16, f64):
        assert {c.reduction for c in grid if c.dtype == dtype} == {"mean", "sum", "none"}
        assert {c.schedule for c in grid if c.dtype == dtype} == {"auto", "token", "vocab"}
        assert any(c.ignore == 1.0 for c in grid if c.dtype == dtype)
        assert any(
            c.aux and c.eps and c.z_loss and c.softcap and c.bias and c.class_weight for c in grid if c.dtype == dtype
        )
    default = Case("default")
    for option in ("bias", "class_weight", "eps", "z_loss", "softcap", "scale", "ignore"):
        assert any(c.id.startswith("alone-") for c in grid if getattr(c, option) != getattr(default, option))
    assert any(c.ignore_index >= 0 and 0 < c.ignore < 1 for c in grid)
    assert {c.shift for c in grid if len(c.lead) == 2} >= {1, 2}
    assert {c.upstream for c in grid} == {"unit", "random"}
    assert any(c.V > 32000 for c in grid)


def _triton_grid_covers_what_the_issue_asks(grid):
    """The Triton grid: every 16/32-bit dtype × reduction and both schedules, each option alone."""
    # float64 is served by the PyTorch backend (test_float64_is_served_by_the_pytorch_backend)
    for dtype in (f32, f16, bf16):
        cases = [c for c in grid if c.dtype == dtype]
        assert {c.reduction for c in cases} == {"mean", "sum", "none"}
        assert {c.schedule for c in cases} >= {"token", "vocab"}
        assert any(c.ignore == 1.0 for c in cases)
        assert any(c.eps and c.z_loss and c.softcap and c.bias and c.class_weight for c in cases)
    for option in ("bias", "class_weight", "eps", "z_loss", "softcap", "scale", "ignore"):
        default = getattr(Case("default"), option)
        assert any(c.id.startswith("alone-") for c in grid if getattr(c, option) != default), option
    assert {c.shift for c in grid} >= {1, 2}
    assert {c.upstream for c in grid} == {"unit", "random"}


@pytest.mark.parametrize("impl", BACKENDS)
def test_grid_covers_what_the_issue_asks(impl):
    coverage = {"torch": _torch_grid_covers_what_the_issue_asks, "triton": _triton_grid_covers_what_the_issue_asks}
    coverage[impl](GRIDS[impl])


# --------------------------------------------------------------------------------------------
# Chunk sizes (N not a multiple of the chunk) and requires_grad combinations, per schedule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["token", "vocab"])
@pytest.mark.parametrize("chunk", [1, 7, 64, None, "small-budget"])
def test_chunk_sizes(schedule, chunk):
    # N = 13 tokens and V = 299 classes: neither a multiple of 7 or 64
    case = Case(
        f"chunk-{schedule}-{chunk}",
        V=299,
        schedule=schedule,
        chunk=None if chunk == "small-budget" else chunk,
        reduction="sum",
        ignore=0.2,
        **ALL,
    )
    if chunk != "small-budget":
        run_case(case, "torch")
        return
    previous = crossent.set_memory_budget(3 * 299 * 4 * 3)  # automatic chunks of a few rows
    try:
        run_case(case, "torch")
    finally:
        crossent.set_memory_budget(previous)


@pytest.mark.parametrize("impl", BACKENDS)
def test_small_memory_budget_chunks_automatically(impl):
    """Automatic chunks from the budget: on Triton, three chunks of 7 tokens, or of 300 classes."""
    case = Case("budget", lead=(7,), V=300, bias=True, reduction="sum", eps=0.1)
    token_row = 300 * 4 + 4 * case.D  # a row of float32 logits and of the ∂hidden product
    vocab_row = 7 * 4 + 4 * case.D  # a column of logits and a row of the ∂W product
    for schedule, budget in (("token", 3 * token_row), ("vocab", 120 * vocab_row)):
        previous = crossent.set_memory_budget(budget)
        try:
            run_case(dataclasses.replace(case, id=f"budget-{schedule}", schedule=schedule), impl)
        finally:
            crossent.set_memory_budget(previous)


@pytest.mark.parametrize("schedule", ["token", "vocab"])
def test_automatic_chunks_are_whole_product_tiles(schedule):
    """Automatic chunks of 16 rows or more are cut down to a multiple of 8 (whole AVX2 tiles of the
    CPU products), so never past the budget; smaller ones stay as the budget gives them."""
    rows_per_chunk = internals.options_module().rows_per_chunk
    loops = internals.torch_linear()

    previous = crossent.set_memory_budget(21 * 299 * 4)  # 21 float32 rows of V = 299
    try:
        assert rows_per_chunk(299 * 4) == 21
        assert rows_per_chunk(299 * 4, multiple=8) == 16
        assert rows_per_chunk(299 * 4, buffers=2, multiple=8) == 10  # under 2·8: as it is
        assert rows_per_chunk(299 * 4, cap=12, multiple=4) == 12
        assert loops.token_chunk_rows(299, f32, 1) == 16
        assert loops.vocab_chunk_rows(45, 13, f32, 1) == 104  # 21·299 // 58 = 108 classes
        # 45 tokens: chunks of 16, 16 and 13 (token); 104, 104 and 91 classes (vocab)
        run_case(Case(f"auto-chunk-tiles-{schedule}", lead=(45,), V=299, schedule=schedule, bias=True), "torch")
    finally:
        crossent.set_memory_budget(previous)


@pytest.mark.parametrize("schedule", ["token", "vocab"])
@pytest.mark.parametrize("dtype, layout", [(f32, "strided"), (bf16, "contig")])
def test_logits_product_in_class_blocks(monkeypatch, schedule, dtype, layout):
    """The CPU logits product runs a cache-sized block of classes at a time: force blocks of 3
    classes (V = 299: 99 blocks and a remainder of 2), with every option, the bias included."""
    monkeypatch.setattr(internals.torch_linear(), "PRODUCT_BLOCK_BYTES", 3 * 13 * 4)  # D = 13, float32 products
    name = f"class-blocks-{schedule}-{dtype}-{layout}"
    run_case(Case(name, V=299, schedule=schedule, dtype=dtype, layout=layout, ignore=0.2, **ALL), "torch")


#: (schedule, grads, reduction, dtype): PyTorch crosses schedules, gradient sets and
#: (reduction, dtype) pairs; Triton covers each schedule × gradient set once, pairwise
REQUIRES_GRAD = {
    "torch": [
        (schedule, wanted, reduction, dtype)
        for reduction, dtype in [("mean", f32), ("none", bf16), ("sum", f64)]
        for wanted in ["h", "w", "b", "hw", "hwb", ""]
        for schedule in ["token", "vocab", "auto"]
    ],
    "triton": [
        ("token", "h", "mean", f32),
        ("vocab", "h", "none", bf16),
        ("token", "w", "none", f16),
        ("vocab", "w", "sum", f32),
        ("token", "b", "sum", bf16),
        ("vocab", "b", "mean", f16),
        ("token", "hw", "mean", bf16),
        ("vocab", "hw", "none", f32),
        ("token", "hwb", "none", f32),
        ("vocab", "hwb", "sum", bf16),
        ("token", "", "sum", f32),
        ("vocab", "", "mean", bf16),
    ],
}


def _requires_grad_sizes(impl: str, schedule: str) -> dict:
    """The shapes and chunk of a requires_grad case: tiny ones under the Triton interpreter."""
    if impl == "torch":
        return dict(lead=BT, chunk=4)
    return dict(lead=(2, 4), D=5, V=37, chunk=3 if schedule == "token" else 16)


@pytest.mark.parametrize("impl, schedule, grads, reduction, dtype", per_backend(REQUIRES_GRAD))
def test_requires_grad_combinations(impl, schedule, grads, reduction, dtype):
    """Only the requested gradients are set (the others stay None); each one is right."""
    case = Case(
        f"grads-{schedule}-{grads}-{reduction}",
        shift=1,
        bias=True,
        class_weight="rand",
        z_loss=1e-3,
        schedule=schedule,
        grads=grads,
        reduction=reduction,
        dtype=dtype,
        ignore=0.2,
        **_requires_grad_sizes(impl, schedule),
    )
    run_case(case, impl)


#: the no_grad case per backend (its inputs drawn from gen("no-grad"))
NO_GRAD_CASE = {"torch": Case("x", bias=True), "triton": Case("no-grad", lead=(5,), V=50, bias=True)}


@pytest.mark.parametrize("impl, schedule", per_backend({impl: ["token", "vocab"] for impl in NO_GRAD_CASE}))
def test_no_grad_mode_computes_no_gradient(impl, schedule):
    hidden, weight, bias, target, _ = make_inputs(NO_GRAD_CASE[impl], gen("no-grad"))
    h, w, b = (t.requires_grad_() for t in (hidden, weight, bias))
    with torch.no_grad():
        loss = crossent.linear_cross_entropy(h, w, target, bias=b, schedule=schedule, impl=impl)
    assert not loss.requires_grad
    ref, _, _ = run_reference(hidden, weight, bias, target, None, torch.ones((), dtype=f64))
    assert_close_to_reference("no_grad loss", loss, ref, None, f32)
    assert h.grad is None and w.grad is None and b.grad is None


#: (schedule, reduction) of the backward-twice test per backend
TWICE = {
    "torch": [("token", "mean"), ("token", "none"), ("vocab", "mean"), ("vocab", "none")],
    "triton": [("token", "mean"), ("vocab", "sum"), ("token", "none"), ("vocab", "none")],
}


def _twice_case(impl: str, reduction: str) -> Case:
    """The backward-twice case of ``impl``."""
    sizes = {} if impl == "torch" else dict(lead=(6,), V=40)  # tiny under the interpreter
    return Case("twice", bias=True, reduction=reduction, z_loss=1e-3, **sizes)


@pytest.mark.parametrize("impl, schedule, reduction", per_backend(TWICE))
def test_backward_twice_accumulates_twice(impl, schedule, reduction):
    """retain_graph: a second backward adds the same gradient again (the first one's in-place
    scaling of gradients computed in the forward must not leak into the second). On Triton bit
    for bit: the gradient computed in forward was scaled in place and let go; the second one is
    recomputed."""
    case = _twice_case(impl, reduction)
    g = gen(f"twice-{schedule}-{reduction}")
    hidden, weight, bias, target, _ = make_inputs(case, g)
    h, w, b = (t.requires_grad_() for t in (hidden, weight, bias))
    kw = dict(reduction=reduction, z_loss=1e-3)
    loss = crossent.linear_cross_entropy(h, w, target, bias=b, schedule=schedule, impl=impl, **kw)
    upstream = make_upstream(case, loss.shape, g)
    loss.backward(upstream.to(loss.dtype), retain_graph=True)
    first = [t.grad.clone() for t in (h, w, b)]
    _, _, ref = run_reference(hidden, weight, bias, target, None, upstream, **kw)
    for name, once in zip("hwb", first, strict=True):
        assert_close_to_reference(f"first grad {name}", once, ref[name], None, f32)
    loss.backward(upstream.to(loss.dtype))  # F.cross_entropy(hidden @ weight.T + bias) allows this
    for name, t, once in zip("hwb", (h, w, b), first, strict=True):
        if impl == "torch":
            torch.testing.assert_close(t.grad, 2 * once, rtol=1e-6, atol=1e-7, msg=f"grad {name}")
        else:
            assert torch.equal(t.grad, 2 * once), f"grad {name}"


@pytest.mark.parametrize("schedule", ["token", "vocab"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(schedule, reduction):
    """DESIGN.md §6: float64 torch.autograd.gradcheck at tiny sizes, every option on (float64 is
    the PyTorch backend's on every impl)."""
    g = gen(f"gradcheck-{schedule}-{reduction}")
    B, T, D, V = 2, 3, 3, 5
    hidden = torch.randn(B, T, D, generator=g, dtype=f64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=f64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=f64, requires_grad=True)
    class_weight = torch.rand(V, generator=g, dtype=f64) + 0.5
    target = torch.tensor([[0, 4, 2], [3, -100, 1]])

    def fn(h, w, b):
        return crossent.linear_cross_entropy(
            h,
            w,
            target,
            bias=b,
            class_weight=class_weight,
            reduction=reduction,
            schedule=schedule,
            chunk_size=2,
            label_smoothing=0.1,
            z_loss=1e-2,
            softcap=2.0,
            logit_scale=0.7,
            shift=1,
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl, schedule", per_backend({impl: ["token", "vocab"] for impl in ("torch", "triton")}))
def test_empty_batch(impl, schedule):
    h, w, b = torch.randn(0, 5), torch.randn(17, 5), torch.randn(17)
    h, w, b = (t.requires_grad_() for t in (h, w, b))
    loss = crossent.linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), bias=b, impl=impl, schedule=schedule)
    loss.backward()
    assert float(loss.detach()) == 0.0 and h.grad.shape == (0, 5)
    assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0


# --------------------------------------------------------------------------------------------
# The long bf16 accumulation: many tokens onto few classes
# --------------------------------------------------------------------------------------------


def _long_bf16_problem():
    g = gen("long-bf16")
    N, V, D = 4096, 12, 32
    # a common offset makes every token push the classifier rows the same way: the partial
    # weight gradients of successive chunks add up coherently, as in real training
    hidden = (torch.randn(N, D, generator=g) * 0.5 + 1.0).to(bf16)
    weight = (torch.randn(V, D, generator=g) * 0.1).to(bf16)
    target = torch.randint(0, V, (N,), generator=g)
    target[: N // 2] = 0  # one frequent class
    return hidden, weight, target


@pytest.mark.parametrize("schedule, chunk", [("token", 16), ("vocab", 1), ("auto", None)])
def test_long_bf16_accumulation(schedule, chunk):
    hidden, weight, target = _long_bf16_problem()
    N, V = target.shape[0], weight.shape[0]
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = crossent.linear_cross_entropy(h, w, target, reduction="sum", schedule=schedule, chunk_size=chunk)
    loss.backward()

    ref_loss, _, ref = run_reference(hidden, weight, None, target, None, torch.tensor(1.0, dtype=f64), reduction="sum")
    base_loss, _, base = run_torch(hidden, weight, None, target, None, torch.tensor(1.0, dtype=f64), reduction="sum")
    assert_close_to_reference("long bf16 loss", loss, ref_loss, base_loss, bf16)
    assert_close_to_reference("long bf16 grad h", h.grad, ref["h"], base["h"], bf16)
    assert_close_to_reference("long bf16 grad w", w.grad, ref["w"], base["w"], bf16)
    ours = rel_error(w.grad, ref["w"])

    # the naive alternative: per-chunk partial weight gradients (exact dlogits, rounded to bf16;
    # each chunk's product itself as PyTorch does it) summed in a bf16 accumulator
    dlogits = torch.softmax(hidden.to(f64) @ weight.to(f64).T, -1) - F.one_hot(target, V).to(f64)
    naive = torch.zeros(weight.shape, dtype=bf16)
    for lo in range(0, N, 16):
        naive += dlogits[lo : lo + 16].to(bf16).T @ hidden[lo : lo + 16]
    naive_error = rel_error(naive, ref["w"])
    bound = 2 * rel_error(base["w"], ref["w"]) + SLACK[bf16]
    assert naive_error > bound, f"bf16 accumulation should fail the §6 rule: {naive_error:.3e} <= {bound:.3e}"
    assert naive_error > 10 * ours, f"crossent {ours:.3e} is not clearly better than bf16 accumulation"


@needs_triton
def test_classifier_gradient_is_accumulated_in_float32():
    """Triton, eight token chunks onto few classes (bf16): the classifier gradient must be the
    float32 sum of the chunks' contributions rounded once — at most a few last-bit flips from the
    exact sum — where a bf16 accumulator is off by several roundings.

    The chunks' ``∂ℓ/∂x`` are those of the cross_entropy kernel on the same bf16 logits, which
    keeps their own rounding out of the comparison (under the interpreter, float32 -> bf16 casts
    truncate where a GPU rounds to nearest)."""
    g = gen("long-bf16")
    N, V, D, chunk = 32, 12, 32, 4
    hidden = (torch.randn(N, D, generator=g) * 0.5 + 1.0).to(bf16)
    weight = (torch.randn(V, D, generator=g) * 0.1).to(bf16)
    target = torch.randint(0, V, (N,), generator=g)
    target[: N // 2] = 0  # one frequent class: the partial gradients add up coherently
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    options = dict(reduction="sum", schedule="token", chunk_size=chunk, impl="triton")
    loss = crossent.linear_cross_entropy(h, w, target, **options)
    loss.backward()
    one = torch.tensor(1.0, dtype=f64)
    ref_loss, _, ref = run_reference(hidden, weight, None, target, None, one, reduction="sum")
    base_loss, _, base = run_torch(hidden, weight, None, target, None, one, reduction="sum")
    assert_close_to_reference("bf16 loss", loss, ref_loss, base_loss, bf16)
    assert_close_to_reference("bf16 grad h", h.grad, ref["h"], base["h"], bf16)
    assert_close_to_reference("bf16 grad w", w.grad, ref["w"], base["w"], bf16)

    logits = (hidden @ weight.T).requires_grad_()  # the token schedule's logits, bf16
    crossent.cross_entropy(logits, target, reduction="sum", impl="triton").backward()
    dz = logits.grad
    exact_sum = (dz.double().T @ hidden.double()).to(bf16)
    naive = torch.zeros(weight.shape, dtype=bf16)  # the same chunks summed in a bf16 accumulator
    for lo in range(0, N, chunk):
        naive += dz[lo : lo + chunk].T @ hidden[lo : lo + chunk]
    assert rel_error(w.grad, exact_sum) < 2**-10
    assert rel_error(naive, exact_sum) > 3 * 2**-10, "the problem must be hard for a bf16 accumulator"


# --------------------------------------------------------------------------------------------
# Module and head forms
# --------------------------------------------------------------------------------------------


def test_module_equals_functional():
    g = gen("module")
    case = Case("module", lead=BT, bias=True, class_weight="rand", ignore=0.2)
    hidden, weight, bias, target, cw = make_inputs(case, g)
    options = dict(
        reduction="sum",
        label_smoothing=0.1,
        z_loss=1e-3,
        softcap=3.0,
        logit_scale=0.75,
        shift=1,
        chunk_size=7,
        schedule="vocab",
        ignore_index=-100,
    )
    loss_fn = crossent.LinearCrossEntropyLoss(class_weight=cw, **options)
    assert "class_weight" in dict(loss_fn.named_buffers())

    results = []
    for call in (
        lambda h, w, b: loss_fn(h, w, target, b),
        lambda h, w, b: crossent.linear_cross_entropy(h, w, target, bias=b, class_weight=cw, **options),
    ):
        h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
        loss = call(h, w, b)
        loss.backward(torch.tensor(0.75))
        results.append([loss.detach(), *grads(h, w, b)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)

    # the module with return_aux and no bias
    aux_fn = crossent.LinearCrossEntropyLoss(return_aux=True, reduction="none", shift=2)
    loss, aux = aux_fn(hidden, weight, target)
    assert loss.shape == BT and isinstance(aux, crossent.LossAux)
    expect = crossent.linear_cross_entropy(hidden, weight, target, reduction="none", shift=2)
    assert torch.equal(loss, expect)


def test_module_class_weight_buffer_moves_with_to():
    cw = torch.rand(11) + 0.5
    loss_fn = crossent.LinearCrossEntropyLoss(class_weight=cw).to(f64)
    assert loss_fn.class_weight.dtype == f64
    head = crossent.LinearCrossEntropyHead(5, 11, class_weight=cw)
    assert "class_weight" in head.state_dict()
    with pytest.raises(ValueError, match=r"class_weight must have shape \(12,\)"):
        crossent.LinearCrossEntropyHead(5, 12, class_weight=cw)
    head = head.to(f64)
    assert head.class_weight.dtype == f64 and head.weight.dtype == f64


def test_head_logits_and_loss():
    torch.manual_seed(3)
    D, V = 13, 301
    cw = torch.rand(V) + 0.5
    options = dict(z_loss=1e-3, label_smoothing=0.1, shift=1, reduction="mean", chunk_size=5, schedule="token")
    head = crossent.LinearCrossEntropyHead(D, V, bias=True, class_weight=cw, **options)
    assert isinstance(head, torch.nn.Linear) and head.bias is not None
    assert head.weight.shape == (V, D)
    hidden = torch.randn(*BT, D)
    target = torch.randint(0, V, BT)
    target[0, 2] = -100

    # without a target: nn.Linear's logits
    logits = head(hidden)
    assert torch.equal(logits, F.linear(hidden, head.weight, head.bias))

    # with one: the fused loss, with the head's own weight, bias and class weights
    calls = []
    head.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    h1 = hidden.clone().requires_grad_()
    loss = head(h1, target)
    assert calls == [2]
    loss.backward()
    head_grads = [h1.grad, head.weight.grad.clone(), head.bias.grad.clone()]
    w = head.weight.detach().clone().requires_grad_()
    b = head.bias.detach().clone().requires_grad_()
    h2 = hidden.clone().requires_grad_()
    expect = crossent.linear_cross_entropy(h2, w, target, bias=b, class_weight=cw, **options)
    expect.backward()
    assert torch.equal(loss.detach(), expect.detach())
    for a, b_ in zip(head_grads, grads(h2, w, b), strict=True):
        assert torch.equal(a, b_)

    # and against the oracle
    kw = dict(z_loss=1e-3, label_smoothing=0.1, shift=1, reduction="mean")
    one = torch.tensor(1.0, dtype=f64)
    ref_loss, _, ref = run_reference(hidden, head.weight, head.bias, target, cw, one, **kw)
    base_loss, _, base = run_torch(hidden, head.weight, head.bias, target, cw, one, **kw)
    assert_close_to_reference("head loss", loss, ref_loss, base_loss, f32)
    for key, grad in zip("hwb", head_grads, strict=True):
        assert_close_to_reference(f"head grad {key}", grad, ref[key], base[key], f32)


def test_head_with_tied_embedding_gets_both_gradients():
    torch.manual_seed(4)
    D, V = 16, 97
    embedding = torch.nn.Embedding(V, D)
    head = crossent.LinearCrossEntropyHead(D, V, shift=1)
    head.weight = embedding.weight
    ids = torch.randint(0, V, (2, 9))
    loss = head(embedding(ids) * 2.0, ids)
    loss.backward()
    assert head.weight is embedding.weight and embedding.weight.grad is not None

    # oracle: the same tied weight in float64, used by the embedding and the classifier
    w64 = embedding.weight.detach().to(f64).requires_grad_()
    R.linear_cross_entropy(w64[ids] * 2.0, w64, ids, shift=1).backward()
    # plain PyTorch at float32
    w32 = embedding.weight.detach().clone().requires_grad_()
    base_loss, _ = torch_at_dtype(F.embedding(ids, w32) * 2.0, w32, None, ids, reduction="mean", shift=1)
    base_loss.backward()
    assert_close_to_reference("tied weight grad", embedding.weight.grad, w64.grad, w32.grad, f32)
    # the embedding path matters here: the classifier path alone is far from the tied gradient
    head_only = embedding.weight.detach().to(f64).requires_grad_()
    R.linear_cross_entropy(w64.detach()[ids] * 2.0, head_only, ids, shift=1).backward()
    assert rel_error(head_only.grad, w64.grad) > 0.05


def test_head_bf16_parameters():
    torch.manual_seed(5)
    head = crossent.LinearCrossEntropyHead(13, 301, bias=True, dtype=bf16, z_loss=1e-4)
    hidden = torch.randn(7, 13).to(bf16).requires_grad_()
    target = torch.randint(0, 301, (7,))
    loss = head(hidden, target)
    assert loss.dtype == f32
    loss.backward()
    assert head.weight.grad.dtype == bf16 and head.bias.grad.dtype == bf16 and hidden.grad.dtype == bf16
    one = torch.tensor(1.0, dtype=f64)
    ref_loss, _, ref = run_reference(hidden, head.weight, head.bias, target, None, one, z_loss=1e-4)
    base_loss, _, base = run_torch(hidden, head.weight, head.bias, target, None, one, reduction="mean", z_loss=1e-4)
    assert_close_to_reference("bf16 head loss", loss, ref_loss, base_loss, bf16)
    for key, grad in zip("hwb", (hidden.grad, head.weight.grad, head.bias.grad), strict=True):
        assert_close_to_reference(f"bf16 head grad {key}", grad, ref[key], base[key], bf16)


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize(
    "schedule, reduction, dtype",
    [("token", "mean", bf16), ("vocab", "none", f32)],
    ids=["token-mean-bf16", "vocab-none-f32"],
)
def test_compile_fullgraph_agrees_with_eager(dynamo_reset, impl, schedule, reduction, dtype):
    """No graph break, eager == compiled bit for bit, no recompilation for a new N."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cw = torch.rand(61) + 0.5

    def fn(hidden, weight, bias, target):
        return crossent.linear_cross_entropy(
            hidden, weight, target, bias=bias, class_weight=cw, shift=1, z_loss=1e-3, label_smoothing=0.1,
            softcap=3.0, reduction=reduction, schedule=schedule, chunk_size=4 if schedule == "token" else 32,
            impl=impl,
        )  # fmt: skip

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter, dynamic=True)
    g = gen(f"compile-{schedule}")
    for i, T in enumerate((3, 5)):
        inputs = compile_inputs(g, 2, T, D=7, V=61, dtype=dtype)  # tiny: the Triton interpreter
        # Triton's eager scales the gradient computed in forward in place, compiled out of place:
        # the same product, rounded alike
        upstream = torch.tensor(0.75) if reduction != "none" else torch.randint(1, 8, (2, T), generator=g) / 4
        eager, comp = eager_and_compiled(fn, compiled, inputs, upstream)
        for name, a, b in zip(("loss", "grad h", "grad w", "grad b"), eager, comp, strict=True):
            assert torch.equal(b, a), f"T={T} {name}"
        if i == 0:
            frames = counter.frame_count
            assert frames >= 1
    assert counter.frame_count == frames, "recompiled for a new N"


def test_compile_agrees_with_eager_without_recompiling(dynamo_reset):
    """PyTorch backend (impl="auto" on CPU tensors), every option: eager and compiled agree, and a
    new N = B·T does not recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cw = torch.rand(301) + 0.5

    def fn(hidden, weight, bias, target):
        return crossent.linear_cross_entropy(
            hidden,
            weight,
            target,
            bias=bias,
            class_weight=cw,
            shift=1,
            z_loss=1e-3,
            label_smoothing=0.1,
            softcap=3.0,
            schedule="token",
            chunk_size=4,
        )

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter, dynamic=True)
    g = gen("compile")
    eager, comp = eager_and_compiled(fn, compiled, compile_inputs(g, 2, 5), torch.tensor(0.75))
    frames = counter.frame_count
    assert frames >= 1
    for name, a, b in zip(("loss", "grad h", "grad w", "grad b"), eager, comp, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in (9, 12):  # a new N = B·T
            eager, comp = eager_and_compiled(fn, compiled, compile_inputs(g, 2, T), torch.tensor(1.25))
            for name, a, b in zip(("loss", "grad h", "grad w", "grad b"), eager, comp, strict=True):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"T={T} {name}")
    assert counter.frame_count == frames, "recompiled for a new N"


def test_compile_vocab_none_and_bad_target_gives_nan(dynamo_reset):
    def fn(hidden, weight, bias, target):
        return crossent.linear_cross_entropy(
            hidden, weight, target, bias=bias, reduction="none", schedule="vocab", chunk_size=64, z_loss=1e-3
        )

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    g = gen("compile-none")
    inputs = compile_inputs(g, 2, 6)
    upstream = torch.randint(1, 8, (2, 6), generator=g).float() / 4
    eager, comp = eager_and_compiled(fn, compiled, inputs, upstream)
    for name, a, b in zip(("loss", "grad h", "grad w", "grad b"), eager, comp, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # out of range under torch.compile: no host sync, that token's loss is NaN (DESIGN.md §3)
    hidden, weight, bias, target = inputs
    bad = target.clone()
    bad[1, 3] = 301
    loss = compiled(hidden, weight, bias, bad)
    assert torch.isnan(loss[1, 3])
    others = torch.ones_like(bad, dtype=torch.bool)
    others[1, 3] = False
    assert torch.isfinite(loss[others]).all()


# --------------------------------------------------------------------------------------------
# torch.autocast and mixed dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_dtype", [f32, bf16])
@pytest.mark.parametrize("schedule", ["token", "vocab"])
def test_autocast_bf16_casts_like_f_linear(hidden_dtype, schedule):
    g = gen(f"autocast-{hidden_dtype}-{schedule}")
    D, V = 13, 301
    hidden = torch.randn(3, 5, D, generator=g).to(hidden_dtype)
    weight = torch.randn(V, D, generator=g) / math.sqrt(D)
    bias = torch.randn(V, generator=g) * 0.5
    target = torch.randint(0, V, (3, 5), generator=g)
    kw = dict(reduction="sum", z_loss=1e-3, label_smoothing=0.1, shift=1)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with torch.autocast("cpu", dtype=bf16):
        loss = crossent.linear_cross_entropy(h, w, target, bias=b, schedule=schedule, **kw)
    assert loss.dtype == f32
    upstream = torch.tensor(0.75, dtype=f64)
    loss.backward(upstream.to(f32))
    assert h.grad.dtype == hidden_dtype and w.grad.dtype == f32 and b.grad.dtype == f32

    # the oracle sees the caller's (float32) values; PyTorch at the autocast dtype runs under autocast
    ref_loss, _, ref = run_reference(hidden, weight, bias, target, None, upstream, **kw)
    hb, wb, bb = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with torch.autocast("cpu", dtype=bf16):
        base_loss, _ = torch_at_dtype(hb, wb, bb, target, **kw)
    base_loss.backward(upstream.to(base_loss.dtype))
    assert_close_to_reference("autocast loss", loss, ref_loss, base_loss, bf16)
    for key, mine, theirs in zip("hwb", (h.grad, w.grad, b.grad), (hb.grad, wb.grad, bb.grad), strict=True):
        assert_close_to_reference(f"autocast grad {key}", mine, ref[key], theirs, bf16)

    # outside autocast, mixed dtypes are an error
    if hidden_dtype != f32:
        with pytest.raises(TypeError, match=r"weight torch\.float32"):
            crossent.linear_cross_entropy(hidden, weight, target, bias=bias, **kw)


def test_autocast_leaves_float64_alone_like_f_linear():
    """autocast casts float32 (not float64) operands: F.linear of float64 tensors stays float64."""
    g = gen("autocast-f64")
    hidden = torch.randn(9, 13, generator=g, dtype=f64)
    weight = torch.randn(301, 13, generator=g, dtype=f64) / math.sqrt(13)
    target = torch.randint(0, 301, (9,), generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=bf16):
        assert F.linear(hidden, weight).dtype == f64
        loss = crossent.linear_cross_entropy(h, w, target, z_loss=1e-3)
    loss.backward()
    one = torch.tensor(1.0, dtype=f64)
    ref_loss, _, ref = run_reference(hidden, weight, None, target, None, one, z_loss=1e-3)
    with torch.autocast("cpu", dtype=bf16):
        base_loss, _, base = run_torch(hidden, weight, None, target, None, one, reduction="mean", z_loss=1e-3)
    assert loss.dtype == f64, f"float64 inputs under autocast gave a {loss.dtype} loss"
    assert_close_to_reference("autocast f64 loss", loss, ref_loss, base_loss, f64)
    assert_close_to_reference("autocast f64 grad h", h.grad, ref["h"], base["h"], f64)
    assert_close_to_reference("autocast f64 grad w", w.grad, ref["w"], base["w"], f64)


# --------------------------------------------------------------------------------------------
# Bad input (DESIGN.md §3)
# --------------------------------------------------------------------------------------------


def _good():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden=torch.randn(4, 8, generator=g),
        weight=torch.randn(10, 8, generator=g),
        target=torch.randint(0, 10, (4,), generator=g),
    )


def _with(**changes):
    def build():
        args = _good()
        for key, value in changes.items():
            args[key] = value(args) if callable(value) else value
        return args

    return build


def _bad_target(position, value, shape=(4,)):
    def change(args):
        t = torch.randint(0, 10, shape)
        t[position] = value
        if len(shape) == 2:
            args["hidden"] = torch.randn(*shape, 8)
        return t

    return change


BAD = [
    ("hidden-D", _with(hidden=torch.randn(4, 7)), ValueError, r"hidden's last dim must equal weight's D=8"),
    ("bias-V", _with(bias=torch.randn(9)), ValueError, r"bias must have shape \(10,\).*\(9,\)"),
    ("bias-2d", _with(bias=torch.randn(10, 1)), ValueError, r"bias must have shape \(10,\)"),
    ("class-weight-V", _with(class_weight=torch.rand(11)), ValueError, r"class_weight must have shape \(10,\)"),
    ("class-weight-int", _with(class_weight=torch.ones(10, dtype=torch.long)), TypeError, r"class_weight"),
    ("weight-1d", _with(weight=torch.randn(80)), ValueError, r"weight must have shape \(V, D\).*\(80,\)"),
    ("weight-3d", _with(weight=torch.randn(2, 10, 8)), ValueError, r"weight must have shape \(V, D\)"),
    ("weight-int", _with(weight=torch.ones(10, 8, dtype=torch.long)), TypeError, r"weight must be a floating"),
    ("hidden-int", _with(hidden=torch.ones(4, 8, dtype=torch.int32)), TypeError, r"hidden must be a floating"),
    ("hidden-not-tensor", _with(hidden=[[0.0] * 8] * 4), TypeError, r"hidden must be a torch\.Tensor"),
    ("weight-dtype", _with(weight=lambda a: a["weight"].double()), TypeError, r"weight torch\.float64"),
    ("bias-dtype", _with(bias=torch.randn(10).to(bf16)), TypeError, r"bias torch\.bfloat16"),
    ("chunk-0", _with(chunk_size=0), ValueError, r"chunk_size.*got 0"),
    ("chunk-negative", _with(chunk_size=-3), ValueError, r"chunk_size.*got -3"),
    ("chunk-float", _with(chunk_size=2.5), TypeError, r"chunk_size"),
    ("schedule-unknown", _with(schedule="rows"), ValueError, r"schedule must be one of.*'rows'"),
    ("shift-negative", _with(shift=-1), ValueError, r"shift must be an int >= 0.*-1"),
    ("target-shape", _with(target=torch.zeros(5, dtype=torch.long)), ValueError, r"target must have shape \(4,\)"),
    (
        "target-extra-dim",
        _with(target=torch.zeros(4, 1, dtype=torch.long)),
        ValueError,
        r"target must have shape \(4,\).*\(4, 1\)",
    ),
    ("target-float", _with(target=torch.rand(4)), TypeError, r"target must hold integer class ids.*float32"),
    ("target-soft", _with(target=torch.rand(4, 10)), TypeError, r"target must hold integer class ids"),
    (
        "hidden-meta",
        _with(hidden=torch.empty(4, 8, device="meta")),
        ValueError,
        r"weight is on cpu but hidden is on meta",
    ),
    (
        "target-meta",
        _with(target=torch.empty(4, dtype=torch.long, device="meta")),
        ValueError,
        r"target is on meta but hidden is on cpu",
    ),
    ("bias-meta", _with(bias=torch.empty(10, device="meta")), ValueError, r"bias is on meta"),
    ("target-too-big", _with(target=_bad_target(2, 10)), IndexError, r"target 10 at position \(2,\).*\[0, 10\)"),
    (
        "target-negative-2d",
        _with(target=_bad_target((1, 2), -5, (2, 3))),
        IndexError,
        r"target -5 at position \(1, 2\)",
    ),
    ("label-smoothing", _with(label_smoothing=1.5), ValueError, r"label_smoothing"),
    ("z-loss-negative", _with(z_loss=-1e-4), ValueError, r"z_loss"),
    ("softcap-zero", _with(softcap=0.0), ValueError, r"softcap"),
    ("logit-scale-zero", _with(logit_scale=0.0), ValueError, r"logit_scale"),
    ("reduction", _with(reduction="avg"), ValueError, r"reduction.*'avg'"),
    ("impl", _with(impl="cuda"), ValueError, r"impl.*'cuda'"),
]


@pytest.mark.parametrize("build, error, message", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input_raises(build, error, message):
    args = build()
    hidden, weight, target = args.pop("hidden"), args.pop("weight"), args.pop("target")
    with pytest.raises(error, match=message):
        crossent.linear_cross_entropy(hidden, weight, target, **args)


def test_shift_on_a_0d_target_is_an_error():
    with pytest.raises(ValueError, match=r"shift=1 needs a target with a sequence dim"):
        crossent.linear_cross_entropy(torch.randn(8), torch.randn(10, 8), torch.tensor(3), shift=1)


def test_shift_true_means_one():
    g = gen("shift-true")
    hidden, weight, _, target, _ = make_inputs(Case("s", lead=BT), g)
    a = crossent.linear_cross_entropy(hidden, weight, target, shift=True, reduction="none")
    b = crossent.linear_cross_entropy(hidden, weight, target, shift=1, reduction="none")
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Out-of-range targets through the backend, and float64
# --------------------------------------------------------------------------------------------


def _backend_op(impl: str):
    """The core's op on flattened inputs, without the public function's validation (the backend
    is ``options.impl``)."""
    return internals.linear_cross_entropy_op


@pytest.mark.parametrize("impl, schedule", per_backend({impl: ["token", "vocab"] for impl in ("torch", "triton")}))
def test_out_of_range_targets_give_nan_without_reading_them(impl, schedule):
    """Through the backend directly (the public function raises IndexError on CPU in eager)."""
    g = gen(f"bad-{schedule}")
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 40, (6,), generator=g)
    target[1], target[4], target[2] = 40, -7, -100
    bad = torch.tensor([False, True, False, False, True, False])
    for reduction in ("none", "sum"):
        opts = internals.options_class()(reduction=reduction, impl=impl, chunk_size=16)
        loss = _backend_op(impl)(hidden, weight, None, target, None, opts, schedule)[0]
        if reduction == "none":
            assert bool(loss[bad].isnan().all()) and bool(loss[~bad].isfinite().all())
            assert float(loss.detach()[2]) == 0.0
            loss.sum().backward()
            assert bool(hidden.grad[bad].isnan().all()) and bool(hidden.grad[~bad].isfinite().all())
            hidden.grad = None
        else:
            assert bool(loss.isnan())


@pytest.mark.parametrize("impl", BACKENDS)
def test_float64_is_served_by_the_pytorch_backend(impl):
    """float64 inputs give a float64 loss, the same bits as the PyTorch backend's on every impl
    (the Triton kernels take float32 arguments)."""
    case = Case("f64", lead=(5,), V=30, dtype=f64, **ALL)
    hidden, weight, bias, target, cw = make_inputs(case, gen("f64"))
    results = []
    for backend in (impl, "torch"):
        h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
        loss = crossent.linear_cross_entropy(h, w, target, bias=b, class_weight=cw, impl=backend, z_loss=1e-3)
        loss.backward()
        results.append([loss.detach(), h.grad, w.grad, b.grad])
    assert results[0][0].dtype == f64
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Reproducibility and the two schedules
# --------------------------------------------------------------------------------------------


def _run(hidden, weight, bias, target, **kw):
    """[loss, grad h, grad w, grad b] of one call on fresh leaves, upstream 0.75."""
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    loss = crossent.linear_cross_entropy(h, w, target, bias=b, **kw)
    loss.backward(torch.full_like(loss, 0.75))
    return [loss.detach(), h.grad, w.grad, b.grad]


@pytest.mark.parametrize("dtype", [f32, bf16])
@pytest.mark.parametrize("schedule", ["token", "vocab", "auto"])
def test_identical_calls_give_identical_bits(dtype, schedule):
    case = Case(f"bits-{dtype}-{schedule}", lead=(37,), V=1031, D=24, dtype=dtype, ignore=0.2, **ALL)
    hidden, weight, bias, target, cw = make_inputs(case, gen(case.id))
    kw = dict(class_weight=cw, z_loss=1e-3, label_smoothing=0.1, softcap=3.0, schedule=schedule)
    first = _run(hidden, weight, bias, target, **kw)
    second = _run(hidden, weight, bias, target, **kw)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def _within(tolerance: float) -> Callable:
    """A comparison of two runs: relative error (tests/judge.py) at most ``tolerance``."""

    def check(name, a, b):
        assert rel_error(b, a) <= tolerance, f"{name}: the runs differ by {rel_error(b, a):.3e}"

    return check


def _close(name, a, b):
    """A comparison of two runs: ``torch.testing.assert_close`` at float32 rounding."""
    torch.testing.assert_close(b, a, rtol=2e-5, atol=1e-7, msg=name)


@dataclass(frozen=True)
class Agreement:
    """Runs of one case with several (schedule, chunk_size), each compared with the first."""

    case: Case
    runs: tuple
    options: tuple  # (name, value) keyword options beside the class weights
    check: Callable

    @property
    def id(self) -> str:
        return self.case.id


_TORCH_AGREE = dict(z_loss=1e-3, label_smoothing=0.1, softcap=3.0)
#: PyTorch: the two schedules, per dtype and reduction, at a tolerance per dtype; Triton: both
#: schedules and several chunk sizes, float32 and every option (the logit scale included)
AGREEMENTS = {
    "torch": [
        Agreement(
            Case(f"agree-{dtype}-{reduction}", lead=(41,), V=1031, D=24, dtype=dtype, ignore=0.2, **ALL),
            (("token", 8), ("vocab", 100)),
            tuple(dict(_TORCH_AGREE, reduction=reduction).items()),
            _within(tolerance),
        )
        for dtype, tolerance in [(f32, 1e-5), (bf16, 4e-3), (f64, 1e-12)]
        for reduction in ["mean", "none"]
    ],
    "triton": [
        Agreement(
            Case("agree", lead=(9,), V=150, ignore=0.2, **ALL),
            (("token", 4), ("token", None), ("vocab", 64), ("vocab", None)),
            tuple(dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0, logit_scale=0.75).items()),
            _close,
        )
    ],
}


@pytest.mark.parametrize("impl, plan", per_backend(AGREEMENTS))
def test_schedules_agree(impl, plan: Agreement):
    """Both schedules (and, on Triton, several chunkings) compute one function."""
    hidden, weight, bias, target, cw = make_inputs(plan.case, gen(plan.case.id))
    kw = dict(plan.options, class_weight=cw, impl=impl)
    results = [_run(hidden, weight, bias, target, schedule=s, chunk_size=c, **kw) for s, c in plan.runs]
    for other in results[1:]:
        for name, a, b in zip(("loss", "grad h", "grad w", "grad b"), results[0], other, strict=True):
            plan.check(name, a, b)


def test_auto_schedule_reproduces_one_of_the_two_at_any_budget():
    """ "auto" reads shapes, dtypes and the budget only: with the default budget and with one
    smaller than a float32 copy of the weight it reproduces one of the explicit schedules bit for
    bit, and it stays within the §6 rule."""
    case = Case("auto-budget", lead=(21,), V=509, D=16, dtype=bf16, bias=True, z_loss=1e-3)
    hidden, weight, bias, target, _ = make_inputs(case, gen(case.id))
    kw = dict(z_loss=1e-3)
    upstream = torch.tensor(0.75, dtype=f64)
    ref_loss, _, ref = run_reference(hidden, weight, bias, target, None, upstream, **kw)
    base_loss, _, base = run_torch(hidden, weight, bias, target, None, upstream, reduction="mean", **kw)
    for budget in (None, 4 * 509 * 16 - 1):
        previous = crossent.set_memory_budget(budget)
        try:
            auto = _run(hidden, weight, bias, target, schedule="auto", **kw)
            explicit = {s: _run(hidden, weight, bias, target, schedule=s, **kw) for s in ("token", "vocab")}
        finally:
            crossent.set_memory_budget(previous)
        matches = [s for s, r in explicit.items() if all(torch.equal(a, b) for a, b in zip(auto, r, strict=True))]
        assert matches, f"budget {budget}: auto equals neither schedule"
        assert_close_to_reference(f"budget {budget} auto loss", auto[0], ref_loss, base_loss, bf16)
        for key, grad in zip("hwb", auto[1:], strict=True):
            assert_close_to_reference(f"budget {budget} auto grad {key}", grad, ref[key], base[key], bf16)
