"""crossent.cross_entropy against the float64 oracle, F.cross_entropy and its own invariants, on
every backend: PyTorch, and Triton under the interpreter (TRITON_INTERPRET=1, set by conftest.py).

DESIGN.md §1 (the math), §2 (the API), §3 (out-of-range targets), §6 (the tolerance rule and the
test grids). Every expected value here comes from ``crossent.reference`` (float64) or from plain
PyTorch, never from crossent itself. Tests about the loss take ``impl``; the Triton interpreter is
about 100× slower than the PyTorch backend, so its grid and sizes are smaller (``cases_for``), and
its vocabulary blocks small enough that the kernels' online merge runs (``triton_settings``).
Tests of how the Triton kernels are built are in test_triton_build.py.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import crossent
from crossent import reference as R
from helpers.common import BACKENDS, bf16, f16, f32, f64, gen, output_dtype, per_backend
from helpers.cross_entropy import (
    DTYPES,
    GRID,
    TRITON_GRID,
    Case,
    cases_for,
    check_against_reference,
    check_aux,
    error_or_inf,
    extreme_case,
    loss_and_grad,
    loss_fn,
    make_inputs,
    make_logits,
    make_target,
    run_case,
    torch_at_dtype,
    torch_baseline,
    triton_settings,
)
from judge import SLACK, assert_close_to_reference, rel_error


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# The grids of DESIGN.md §6 (helpers/cross_entropy.py): every case against the float64 oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl, case", per_backend({impl: cases_for(impl) for impl in ("torch", "triton")}))
def test_grid_against_reference(impl, case: Case):
    run_case(case, impl)


def test_grid_covers_what_design_6_asks():
    """The grid is chosen, not crossed: check the pairs that matter are all there."""
    ids = {c.id for c in GRID}
    assert len(ids) == len(GRID)
    for dtype in DTYPES:
        assert {c.reduction for c in GRID if c.dtype == dtype} == {"mean", "sum", "none"}
        assert any(c.layout != "contig" for c in GRID if c.dtype == dtype)
        assert any(c.inplace for c in GRID if c.dtype == dtype)
        assert any(c.aux for c in GRID if c.dtype == dtype)
        assert any(c.soft for c in GRID if c.dtype == dtype)
        assert any(c.ignore == 1.0 for c in GRID if c.dtype == dtype)
    assert {c.V for c in GRID} >= {1, 5, 127, 32000, 128256}
    assert {c.layout for c in GRID} == {"contig", "slice", "transpose", "shift"}
    assert {c.chunk for c in GRID} == {None, 1, 7}
    assert {c.ignore for c in GRID} == {0.0, 0.2, 1.0}
    assert {len(c.lead) for c in GRID} == {1, 2}
    for option in ("weight", "eps", "z_loss", "softcap", "scale"):
        assert any(c.id.startswith("alone-") for c in GRID if getattr(c, option) not in (None, 0.0, 1.0))
    assert any(c.soft and c.eps and c.weight for c in GRID) and any(c.soft and not c.eps and not c.weight for c in GRID)
    assert any(c.weight == "zero_kept" for c in GRID)
    assert any(c.ignore_index >= 0 and c.ignore < 1.0 for c in GRID)
    assert {c.upstream for c in GRID} == {"unit", "random"}


def test_triton_grid_covers_blocks_and_gradient_modes():
    """The Triton grid is small, so check what it is for: V below, at and above a vocabulary block,
    both gradient modes, every dtype the kernels serve with hard and soft targets, every reduction."""
    assert len({c.id for c in TRITON_GRID}) == len(TRITON_GRID)
    assert all(c.block is not None and c.grad_in_forward is not None for c in TRITON_GRID)
    assert any(c.V < c.block for c in TRITON_GRID) and any(c.V > c.block for c in TRITON_GRID)
    assert any(c.V % c.block == 0 for c in TRITON_GRID)  # V a whole number of blocks
    assert {c.grad_in_forward for c in TRITON_GRID} == {True, False}
    assert {c.dtype for c in TRITON_GRID} == {f32, bf16, f16}
    assert {c.reduction for c in TRITON_GRID} == {"mean", "sum", "none"}
    assert {c.soft for c in TRITON_GRID} == {True, False}
    assert any(c.ignore_index >= 0 and c.ignore > 0 for c in TRITON_GRID)


# --------------------------------------------------------------------------------------------
# Drop-in: F.cross_entropy on 2-D float32 inputs, and each documented difference
# --------------------------------------------------------------------------------------------

DROP_IN = [  # (id, soft, weighted, label_smoothing, ignore_index, ignore fraction)
    ("plain", False, False, 0.0, -100, 0.0),
    ("weight", False, True, 0.0, -100, 0.0),
    ("smoothing", False, False, 0.1, -100, 0.0),
    ("ignore", False, False, 0.0, -100, 0.3),
    ("ignore-real-class", False, False, 0.0, 2, 0.3),
    ("weight-smoothing-ignore", False, True, 0.2, -100, 0.3),
    ("soft", True, False, 0.0, -100, 0.0),
    ("soft-weight-smoothing", True, True, 0.1, -100, 0.0),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name, soft, weighted, eps, ignore_index, frac", DROP_IN, ids=[d[0] for d in DROP_IN])
def test_drop_in_equals_f_cross_entropy(name, soft, weighted, eps, ignore_index, frac, reduction):
    g = gen(f"drop-in-{name}-{reduction}")
    N, V = 24, 37
    logits = torch.randn(N, V, generator=g) * 3
    if soft:
        target = torch.softmax(torch.randn(N, V, generator=g), -1)
    else:
        target = torch.randint(0, V, (N,), generator=g)
        target[torch.randperm(N, generator=g)[: round(frac * N)]] = ignore_index
    weight = torch.rand(V, generator=g) + 0.5 if weighted else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=eps)
    if not soft:
        kw["ignore_index"] = ignore_index
    upstream = torch.rand(N, generator=g) + 0.5 if reduction == "none" else torch.tensor(1.0)
    results = []
    for fn in (crossent.cross_entropy, F.cross_entropy):
        x = logits.clone().requires_grad_()
        loss = fn(x, target, **kw)
        loss.backward(upstream)
        results.append((loss.detach(), x.grad))
    (ours, our_grad), (theirs, their_grad) = results
    assert ours.dtype == theirs.dtype == f32
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)


def test_difference_class_dim_is_last_for_3d():
    g = gen("class-dim-last")
    B, T, V = 2, 6, 11
    logits = torch.randn(B, T, V, generator=g) * 3
    target = torch.randint(0, V, (B, T), generator=g)
    target[0, 1] = -100
    for reduction in ("none", "mean"):
        ours = crossent.cross_entropy(logits, target, reduction=reduction)
        theirs = F.cross_entropy(logits.permute(0, 2, 1), target, reduction=reduction)  # PyTorch: classes at dim 1
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs)
    with pytest.raises((RuntimeError, ValueError)):
        F.cross_entropy(logits, target)  # PyTorch reads dim 1 (T) as the classes


@pytest.mark.parametrize("dtype", [f16, bf16])
def test_difference_16_bit_input_gives_float32_loss(dtype):
    g = gen(f"16bit-{dtype}")
    logits = (torch.randn(16, 50, generator=g) * 3).to(dtype)
    target = torch.randint(0, 50, (16,), generator=g)
    for reduction in ("mean", "sum", "none"):
        ours = crossent.cross_entropy(logits, target, reduction=reduction)
        assert F.cross_entropy(logits, target, reduction=reduction).dtype == dtype
        assert ours.dtype == f32
        # the same (rounded) input computed in float32 by PyTorch
        torch.testing.assert_close(ours, F.cross_entropy(logits.float(), target, reduction=reduction))
    x = logits.clone().requires_grad_()
    crossent.cross_entropy(x, target).backward()
    assert x.grad.dtype == dtype  # gradients have their input's dtype


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("how", ["all-ignored", "zero-class-weights", "zero-on-kept-targets"])
def test_difference_zero_denominator_gives_zero_not_nan(impl, how, reduction):
    """Nothing left to average (every target ignored, or class weights 0 on every kept token):
    PyTorch's "mean" is 0/0 = NaN; crossent's loss and gradient are exactly 0, "sum" too, and
    LossAux counts what was kept."""
    logits, target, _ = make_inputs(6, 50, f16, seed=9)
    weight, kept = None, 6
    if how == "all-ignored":
        target, kept = torch.full_like(target, -100), 0
    elif how == "zero-class-weights":
        weight = torch.zeros(50)
    else:
        weight = torch.rand(50, generator=gen(how)) + 0.5
        weight[target] = 0.0
    if reduction == "mean":
        assert math.isnan(F.cross_entropy(logits.float(), target, weight=weight).item())
    x = logits.clone().requires_grad_()
    with triton_settings(impl, block=32):
        loss, aux = crossent.cross_entropy(x, target, weight=weight, reduction=reduction, impl=impl, return_aux=True)
        loss.backward()
    assert float(loss.detach()) == 0.0 and not bool(x.grad.any())
    assert torch.count_nonzero(x.grad) == 0
    assert int(aux.n_tokens) == kept and float(aux.weight_sum) == 0.0
    if kept == 0:
        assert float(aux.accuracy) == 0.0


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", BACKENDS)
def test_invariants(impl):
    """Shift invariance, log V for uniform logits, a masked batch equals its kept subset."""
    ours = loss_fn(impl)
    with triton_settings(impl, block=64):
        logits, target, _ = make_inputs(12, 200, f32, seed=11, ignore_fraction=0.2)
        base = ours(logits, target, label_smoothing=0.1)
        shifted = ours(logits + 100.0, target, label_smoothing=0.1)
        torch.testing.assert_close(shifted, base, rtol=2e-5, atol=0)  # ulp(100) is 8e-6 per logit
        uniform = ours(torch.full((5, 200), 3.0), torch.randint(0, 200, (5,)), reduction="none")
        torch.testing.assert_close(uniform, torch.full((5,), math.log(200)), rtol=1e-6, atol=0)
        masked = ours(logits, torch.where(torch.arange(12) % 3 == 0, -100, target), reduction="sum")
        keep = torch.arange(12) % 3 != 0
        subset = ours(logits[keep], target[keep], reduction="sum")
    torch.testing.assert_close(masked, subset, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"weight": True, "label_smoothing": 0.1, "reduction": "none"},
        {"soft": True, "label_smoothing": 0.2, "reduction": "sum", "logit_scale": 0.5},
        {"ignore": True, "logit_scale": -2.0, "chunk_size": 3},
    ],
    ids=["plain", "weight-smoothing-none", "soft-scale-sum", "ignore-negscale-chunk3"],
)
def test_shift_invariance(kw):
    kw = dict(kw)
    g = gen(f"shift-{sorted(kw)}")
    N, V = 10, 23
    # multiples of 1/8 with |x| < 8: x + 64 is exact in float32, so the inputs differ by exactly 64
    logits = torch.randint(-63, 64, (N, V), generator=g).float() / 8
    target = torch.randint(0, V, (N,), generator=g)
    if kw.pop("soft", False):
        target = torch.softmax(torch.randn(N, V, generator=g), -1)
    if kw.pop("ignore", False):
        target[::3] = -100
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(V, generator=g) + 0.5
    out = []
    for shift in (0.0, 64.0):
        x = (logits + shift).requires_grad_()
        loss = crossent.cross_entropy(x, target, **kw)
        loss.sum().backward()
        out.append((loss.detach(), x.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 32000])
def test_uniform_logits_give_log_v(dtype, V):
    logits = torch.full((3, V), 2.5, dtype=dtype)
    target = torch.tensor([0, V // 2, V - 1])
    for eps in (0.0, 0.3):
        loss = crossent.cross_entropy(logits, target, label_smoothing=eps)
        assert loss.dtype == output_dtype(dtype)
        assert abs(loss.item() - math.log(V)) <= 1e-6 * max(1.0, math.log(V)), (eps, loss.item())
    x = logits.clone().requires_grad_()
    crossent.cross_entropy(x, target).backward()
    expected = torch.full((3, V), 1.0 / V, dtype=f64) / 3
    expected[torch.arange(3), target] -= 1.0 / 3
    torch.testing.assert_close(x.grad.to(f64), expected, rtol=0, atol=1e-2 if dtype in (f16, bf16) else 1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [f32, f64])
def test_masked_equals_subset(reduction, dtype):
    g = gen(f"masked-{reduction}-{dtype}")
    N, V = 20, 31
    logits = (torch.randn(N, V, generator=g, dtype=f64) * 3).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    weight = (torch.rand(V, generator=g, dtype=f64) + 0.1).to(dtype)
    masked = target.clone()
    masked[::3] = -100
    kept = masked != -100
    kw = dict(weight=weight, reduction=reduction, z_loss=1e-2, label_smoothing=0.1, softcap=8.0)
    x_full = logits.clone().requires_grad_()
    full = crossent.cross_entropy(x_full, masked, **kw)
    full.sum().backward()
    x_sub = logits[kept].clone().requires_grad_()
    subset = crossent.cross_entropy(x_sub, target[kept], **kw)
    subset.sum().backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == f64 else dict(rtol=1e-6, atol=1e-6)
    if reduction == "none":
        torch.testing.assert_close(full[kept], subset, **tol)
        assert torch.count_nonzero(full[~kept]) == 0
    else:
        torch.testing.assert_close(full, subset, **tol)
    torch.testing.assert_close(x_full.grad[kept], x_sub.grad, **tol)
    assert torch.count_nonzero(x_full.grad[~kept]) == 0


GRADCHECK = [  # every option on, tiny float64 sizes
    ("hard", dict(ignore_index=2, label_smoothing=0.1, z_loss=0.05, softcap=2.0, logit_scale=0.7, chunk_size=3)),
    ("hard-negscale-chunk1", dict(label_smoothing=0.3, z_loss=0.01, softcap=4.0, logit_scale=-1.5, chunk_size=1)),
    ("soft", dict(label_smoothing=0.2, z_loss=0.05, softcap=2.0, logit_scale=0.7, chunk_size=2)),
]


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("name, kw", GRADCHECK, ids=[c[0] for c in GRADCHECK])
def test_gradcheck_float64(name, kw, reduction):
    g = gen(f"gradcheck-{name}-{reduction}")
    N, V = 5, 6
    logits = torch.randn(N, V, generator=g, dtype=f64) * 2
    weight = torch.rand(V, generator=g, dtype=f64) + 0.5
    if name.startswith("soft"):
        target = torch.softmax(torch.randn(N, V, generator=g, dtype=f64), -1)
    else:
        target = torch.tensor([0, 2, 5, 1, 2])  # includes the ignored id 2 when ignore_index=2

    def fn(x):
        return crossent.cross_entropy(x, target, weight=weight, reduction=reduction, **kw)

    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_float64_compiled(fresh_dynamo):
    """The same check through torch.compile (aot_eager), whose backward recomputes from (m, log S)."""
    g = gen("gradcheck-compiled")
    N, V = 5, 6
    logits = torch.randn(N, V, generator=g, dtype=f64) * 2
    weight = torch.rand(V, generator=g, dtype=f64) + 0.5
    target = torch.tensor([0, 2, 5, 1, 2])
    kw = dict(weight=weight, ignore_index=2, label_smoothing=0.1, z_loss=0.05, softcap=2.0, logit_scale=0.7)
    compiled = torch.compile(crossent.cross_entropy, backend="aot_eager", fullgraph=True)
    for reduction in ("none", "mean"):
        x = logits.clone().requires_grad_()

        def fn(x, reduction=reduction):
            return compiled(x, target, reduction=reduction, chunk_size=2, **kw)

        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


# the interpreter affords fewer rows; float64 runs on the PyTorch backend even with impl="triton"
SECOND_BACKWARD = {"torch": [(f64, 1.0), (f64, 2.5)], "triton": [(f32, 1.0)]}


@pytest.mark.parametrize("impl, dtype, upstream", per_backend(SECOND_BACKWARD))
def test_second_backward_through_a_retained_graph(impl, dtype, upstream):
    """A retained graph can be differentiated twice, with the same result (a gradient computed in
    the forward is consumed by the first backward, so the second runs the forward's gradient path
    again: core/autograd.py); gradcheck relies on it."""
    logits, target, _ = make_inputs(10, 100, dtype, seed=7, ignore_fraction=0.2)
    kw = dict(label_smoothing=0.1, z_loss=1e-2)
    x = logits.clone().requires_grad_()
    with triton_settings(impl, block=64, grad_in_forward=True):
        loss = crossent.cross_entropy(x, target, impl=impl, **kw)
        u = torch.tensor(upstream, dtype=loss.dtype)
        (first,) = torch.autograd.grad(loss, x, u, retain_graph=True)
        first = first.clone()
        (second,) = torch.autograd.grad(loss, x, u, retain_graph=True)
        (loss * 3.0).backward(u)  # and once more, scaled
    torch.testing.assert_close(x.grad, 3.0 * first, rtol=1e-6, atol=1e-9)
    xr = logits.to(f64, copy=True).requires_grad_()
    R.cross_entropy(xr, target, **kw).backward(u.to(f64))
    if dtype == f64:
        torch.testing.assert_close(first, xr.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(second, xr.grad, rtol=1e-10, atol=1e-12)
        return
    xb = logits.clone().requires_grad_()
    torch_baseline(xb, target, **kw).backward(u)
    assert_close_to_reference("first grad", first, xr.grad, xb.grad, dtype)
    assert_close_to_reference("second grad", second, xr.grad, xb.grad, dtype)


# the interpreter affords fewer rows and a smaller vocabulary, cut in blocks of 128
IDENTICAL_BITS = {"torch": [(f32, 64, 1000), (bf16, 64, 1000)], "triton": [(f16, 16, 500)]}


@pytest.mark.parametrize("impl, dtype, N, V", per_backend(IDENTICAL_BITS))
def test_identical_calls_give_identical_bits(impl, dtype, N, V):
    g = gen(f"bits-{dtype}" if impl == "torch" else f"bits-{impl}-{dtype}")
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[::5] = -100
    weight = (torch.rand(V, generator=g) + 0.5).to(dtype)
    kw = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=20.0, logit_scale=0.9)
    runs = []
    with triton_settings(impl, block=128):
        for _ in range(2):
            for reduction in ("mean", "none"):
                x = logits.clone().requires_grad_()
                loss = crossent.cross_entropy(x, target, reduction=reduction, impl=impl, **kw)
                loss.backward(torch.full_like(loss, 1.7))  # not 1: the Triton in-forward gradient is rescaled
                runs.append((reduction, loss.detach(), x.grad))
    for (r1, l1, g1), (r2, l2, g2) in zip(runs[:2], runs[2:], strict=True):
        assert r1 == r2
        assert torch.equal(l1, l2) and torch.equal(g1, g2)


# --------------------------------------------------------------------------------------------
# return_aux
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_aux_against_reference(impl, reduction):
    g = gen(f"aux-{reduction}")
    B, T, V = 3, 7, 19
    logits = torch.randn(B, T, V, generator=g) * 3
    target = torch.randint(0, V, (B, T), generator=g)
    target[0, :3] = -100
    # make some tokens right for sure, so accuracy is neither 0 nor 1 by chance
    logits[1, :4] = -5.0
    logits[1, torch.arange(4), target[1, :4]] = 5.0
    weight = torch.rand(V, generator=g) + 0.5
    kw = dict(weight=weight, reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=15.0, logit_scale=1.3)
    loss, aux = crossent.cross_entropy(logits, target, return_aux=True, impl=impl, **kw)
    ref_loss, ref = R.cross_entropy(logits.double(), target, return_aux=True, **{**kw, "weight": weight.double()})
    base_loss, base = torch_at_dtype(logits, target, **kw)
    assert 0.0 < float(ref.accuracy) < 1.0
    check_aux(f"aux-{reduction}", aux, ref, base, f32, (B, T))
    assert_close_to_reference("loss", loss, ref_loss, base_loss, f32)
    torch.testing.assert_close(aux.ce + aux.z_loss, loss)  # the parts add up to the loss


@pytest.mark.parametrize("impl", BACKENDS)
def test_loss_aux_soft_targets_and_no_z_loss(impl):
    g = gen("aux-soft")
    N, V = 9, 12
    logits = torch.randn(N, V, generator=g) * 3
    target = torch.softmax(torch.randn(N, V, generator=g) * 3, -1)
    loss, aux = crossent.cross_entropy(logits, target, return_aux=True, impl=impl)
    _, ref = R.cross_entropy(logits.double(), target, return_aux=True)
    _, base = torch_at_dtype(logits, target, None, reduction="mean")
    check_aux("aux-soft", aux, ref, base, f32, (N,))
    assert int(aux.n_tokens) == N and aux.z_loss.item() == 0.0


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize(
    "dtype, soft, options",
    [
        (f32, False, dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=5)),
        (bf16, False, dict(reduction="none", z_loss=1e-2, weight="random")),
        (f16, True, dict(reduction="sum", label_smoothing=0.2, z_loss=1e-3)),
    ],
)
def test_aux_fields(impl, dtype, soft, options):
    """Every LossAux field against the oracle: ce and z_loss within the slack alone, weight_sum
    and accuracy to float32 rounding, with class weights of another dtype than the logits."""
    N, V = 24, 200
    ignore_index = options.get("ignore_index", -100)
    logits, target, weight = make_inputs(
        N, V, dtype, seed=5, soft=soft, weighted=True, ignore_fraction=0.3, ignore_index=ignore_index
    )
    if not soft:
        target[:3] = 5  # ignore_index=5 is also a real class id: these rows are dropped when it is
    options = dict(options)
    if options.get("weight") == "random":
        options["weight"] = weight
    with triton_settings(impl, block=64):
        loss, aux = crossent.cross_entropy(logits, target, impl=impl, return_aux=True, **options)
    ref_loss, ref = R.cross_entropy(logits, target, return_aux=True, **options)
    pt = torch_baseline(logits, target, **options)
    assert_close_to_reference("loss", loss, ref_loss, pt, dtype)
    z = logits.float()
    pt_lse = torch.logsumexp(z.to(dtype), -1)
    pt_entropy = -(torch.softmax(z.to(dtype), -1) * torch.log_softmax(z.to(dtype), -1)).sum(-1)
    assert_close_to_reference("lse", aux.lse, ref.lse, pt_lse, dtype)
    assert_close_to_reference("entropy", aux.entropy, ref.entropy, pt_entropy, dtype)
    assert_close_to_reference("ce", aux.ce, ref.ce, None, dtype)
    assert_close_to_reference("z_loss", aux.z_loss, ref.z_loss, None, dtype)
    torch.testing.assert_close(aux.ce + aux.z_loss, loss)
    assert aux.n_tokens.dtype == torch.int64 and int(aux.n_tokens) == int(ref.n_tokens)
    assert aux.weight_sum.dtype == f32
    torch.testing.assert_close(aux.weight_sum.double(), ref.weight_sum, rtol=1e-6, atol=0)
    assert aux.accuracy.dtype == f32 and float(aux.accuracy) == pytest.approx(float(ref.accuracy), abs=1e-7)
    for field in ("lse", "entropy"):
        assert getattr(aux, field).dtype == f32 and getattr(aux, field).shape == logits.shape[:-1]


# --------------------------------------------------------------------------------------------
# Layouts: strides are passed, never copied; results equal the contiguous ones bit for bit
# --------------------------------------------------------------------------------------------


def _same_as_contiguous(impl, x, target, **options):
    """Loss and gradient of the strided ``x`` equal those of a contiguous copy, bit for bit."""
    ours = loss_fn(impl)
    ours_nc = loss_and_grad(ours, x, target, torch.tensor(1.3), x.dtype, **options)
    ours_c = loss_and_grad(ours, x.contiguous(), target.contiguous(), torch.tensor(1.3), x.dtype, **options)
    assert torch.equal(ours_nc[0], ours_c[0])
    assert torch.equal(ours_nc[1], ours_c[1])


@pytest.mark.parametrize("impl", BACKENDS)
def test_rows_that_cannot_be_merged(impl):
    """logits[:, :-1] of a (B, T, V) tensor: the leading dims are iterated as 2-D blocks."""
    full = (torch.randn(3, 9, 100) * 2).to(bf16)
    target = torch.randint(0, 100, (3, 9))
    target[1, 2] = -100
    x = full[:, :-1]
    with triton_settings(impl, block=64):
        _same_as_contiguous(impl, x, target[:, 1:], z_loss=1e-3)
        check_against_reference(impl, x, target[:, 1:], bf16, reduction="none")


@pytest.mark.parametrize("impl", BACKENDS)
def test_columns_strided_and_rows_padded(impl):
    target = torch.randint(0, 90, (10,))
    transposed = torch.randn(90, 10).t()  # column stride 10: int64 column offsets
    padded = torch.randn(10, 128)[:, :90]  # row stride 128 > V
    with triton_settings(impl, block=64):
        _same_as_contiguous(impl, transposed, target, label_smoothing=0.1, softcap=3.0)
        _same_as_contiguous(impl, padded, target, weight=torch.rand(90) + 0.5, label_smoothing=0.2)


@pytest.mark.parametrize("impl", BACKENDS)
def test_soft_targets_strided(impl):
    x = torch.randn(70, 12).t().to(f16)
    p = torch.softmax(torch.randn(70, 12), 0).t()  # (12, 70), column stride 12
    with triton_settings(impl, block=32):
        _same_as_contiguous(impl, x, p, label_smoothing=0.1, z_loss=1e-3)


# --------------------------------------------------------------------------------------------
# Gradient plumbing: in place, compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", BACKENDS)
def test_inplace_backward_overwrites_the_logits(impl):
    base, target, weight = make_inputs(16, 130, bf16, seed=6, weighted=True, ignore_fraction=0.2)
    options = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    with triton_settings(impl, block=64):
        expected = loss_and_grad(loss_fn(impl), base, target, torch.ones(()), bf16, **options)

        leaf = base.clone().requires_grad_()
        logits = leaf * 1.0  # a non-leaf, as an LM head's output
        storage = logits.data_ptr()
        loss = crossent.cross_entropy(logits, target, impl=impl, inplace_backward=True, **options)
        loss.backward()
        assert torch.equal(loss.detach(), expected[0])
        assert torch.equal(leaf.grad, expected[1])
        assert logits.data_ptr() == storage and torch.equal(logits.detach(), expected[1])  # consumed

        leaf = base.clone().requires_grad_()
        loss = crossent.cross_entropy(leaf * 1.0, target, impl=impl, inplace_backward=True, **options)
        (loss * 2.5).backward()
    torch.testing.assert_close(leaf.grad.float(), (expected[1].float() * 2.5).to(bf16).float(), rtol=1e-2, atol=0)


# Triton: bit for bit (upstream 1: eager's in-forward gradient is not rescaled, so both round once,
# alike). PyTorch: compiled, the backward recomputes from (m, log S) where eager kept the forward's
# values, so the gradients agree to rounding only.
COMPILE_BIT_FOR_BIT = {"torch": [False], "triton": [True]}


@pytest.mark.parametrize("impl, bit_for_bit", per_backend(COMPILE_BIT_FOR_BIT))
def test_compile_fullgraph_agrees_with_eager(fresh_dynamo, impl, bit_for_bit):
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def step(x, target, weight):
        return crossent.cross_entropy(x, target, weight=weight, impl=impl, label_smoothing=0.1, z_loss=1e-3)

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    with triton_settings(impl, block=64):
        for T in (8, 12, 16):  # new sequence lengths: at most one recompile (to a dynamic shape)
            logits, target, weight = make_inputs(T, 150, bf16, seed=T, weighted=True, ignore_fraction=0.2)
            eager = loss_and_grad(step, logits, target, torch.ones(()), bf16, weight=weight)
            comp = loss_and_grad(compiled, logits, target, torch.ones(()), bf16, weight=weight)
            if bit_for_bit:
                assert torch.equal(comp[0], eager[0])
                assert torch.equal(comp[1], eager[1])
            else:
                torch.testing.assert_close(comp[0], eager[0])
                torch.testing.assert_close(comp[1], eager[1])
    assert counter.frame_count <= 2


@pytest.mark.parametrize("impl", BACKENDS)
def test_compile_inplace_and_aux(fresh_dynamo, impl):
    logits, target, _ = make_inputs(8, 40, f32, seed=8, ignore_fraction=0.2)

    def fn(x):
        loss, aux = crossent.cross_entropy(x * 1.0, target, impl=impl, inplace_backward=True, return_aux=True)
        return loss, aux.lse, aux.entropy, aux.accuracy

    results = []
    with triton_settings(impl, block=8192):
        for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
            x = logits.clone().requires_grad_()
            loss, *stats = f(x)
            (loss * 1.5).backward()
            results.append((loss.detach(), *stats, x.grad))
    for eager, compiled in zip(*results, strict=True):
        assert torch.equal(compiled, eager)


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) agrees with eager: the PyTorch backend's cases
# --------------------------------------------------------------------------------------------


COMPILE_CASES = [  # (id, dtype, lead, layout, soft, kwargs)
    (
        "f32-mean-all",
        f32,
        (12,),
        "contig",
        False,
        dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=10.0, logit_scale=0.5),
    ),
    ("bf16-none-BT-shift", bf16, (2, 5), "shift", False, dict(reduction="none", label_smoothing=0.1)),
    (
        "f16-sum-soft-weight-aux",
        f16,
        (12,),
        "contig",
        True,
        dict(reduction="sum", weight=True, label_smoothing=0.1, return_aux=True),
    ),
    ("f32-mean-aux-chunk7", f32, (2, 5), "transpose", False, dict(return_aux=True, z_loss=1e-2, chunk_size=7)),
    ("f32-mean-inplace", f32, (12,), "slice", False, dict(inplace_backward=True, ignore_index=3)),
    ("f64-none-ignore-all", f64, (6,), "contig", False, dict(reduction="none", ignore_index=0)),
]


def _compile_inputs(dtype, lead, layout, soft, kw, g, V=33):
    case = Case("c", V=V, lead=lead, layout=layout, dtype=dtype, soft=soft)
    base, view = make_logits(case, g)
    target = make_target(case, g)
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(V, generator=g) + 0.5).to(dtype)
    if not soft and kw.get("ignore_index") == 0:
        target[:] = 0  # everything ignored
    elif not soft:
        target.view(-1)[::4] = kw.get("ignore_index", -100)
    return base, view, target, kw


def _run(fn, base, view, target, kw, upstream_seed):
    leaf = base.clone().requires_grad_()
    x = view(leaf * 1 if kw.get("inplace_backward") else leaf)
    out = fn(x, target, **kw)
    loss, aux = out if kw.get("return_aux") else (out, None)
    u = torch.randint(1, 8, loss.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(loss.dtype) / 4
    loss.backward(u)
    return loss.detach(), view(leaf.grad), aux


@pytest.mark.parametrize("cid, dtype, lead, layout, soft, kw", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compile_aot_eager_agrees_with_eager(fresh_dynamo, cid, dtype, lead, layout, soft, kw):
    g = gen(f"compile-{cid}")
    base, view, target, kw = _compile_inputs(dtype, lead, layout, soft, kw, g)
    compiled = torch.compile(crossent.cross_entropy, backend="aot_eager", fullgraph=True)
    eager_loss, eager_grad, eager_aux = _run(crossent.cross_entropy, base, view, target, kw, 1)
    comp_loss, comp_grad, comp_aux = _run(compiled, base, view, target, kw, 1)
    torch.testing.assert_close(comp_loss, eager_loss)
    torch.testing.assert_close(comp_grad, eager_grad)
    assert comp_grad.dtype == dtype
    if eager_aux is not None:
        for name in crossent.LossAux._fields:
            torch.testing.assert_close(getattr(comp_aux, name), getattr(eager_aux, name))


def test_compile_inductor_agrees_with_eager(fresh_dynamo):
    g = gen("inductor")
    V = 50
    logits = torch.randn(4, 6, V, generator=g) * 3
    target = torch.randint(0, V, (4, 6), generator=g)
    target[:, 0] = -100
    weight = torch.rand(V, generator=g) + 0.5
    kw = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=10.0, logit_scale=0.5)

    def step(x, t):
        return crossent.cross_entropy(x * 1.5, t, **kw) * 2.0  # ops around the loss for inductor to fuse

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        x = logits.clone().requires_grad_()
        loss = fn(x, target)
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_compile_no_recompile_for_new_sequence_length(fresh_dynamo, how):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    V = 29

    def loss_fn(x, t):
        return crossent.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3)

    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True, dynamic=True if how == "dynamic=True" else None)

    def call(T):
        g = gen(f"recompile-{T}")
        logits = torch.randn(2, T, V, generator=g) * 3
        target = torch.randint(0, V, (2, T), generator=g)
        x = logits.clone().requires_grad_()
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 1)
            torch._dynamo.mark_dynamic(target, 1)
        loss = compiled(x, target)
        loss.backward()
        y = logits.clone().requires_grad_()
        expect = loss_fn(y, target)
        expect.backward()
        torch.testing.assert_close(loss, expect)
        torch.testing.assert_close(x.grad, y.grad)

    call(5)
    # One frame. With dynamic=True Dynamo first traces the float defaults (logit_scale=1.0) as
    # symbolic floats, then restarts the analysis once to specialise them: the backend is called
    # twice for that single first compilation. What matters is that nothing compiles again.
    first = counter.frame_count
    assert first == (2 if how == "dynamic=True" else 1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in (9, 17, 3):
            call(T)
    assert counter.frame_count == first


def test_compile_no_graph_break(fresh_dynamo):
    logits = torch.randn(2, 5, 13)
    target = torch.randint(0, 13, (2, 5))

    def loss_fn(x, t):
        loss, aux = crossent.cross_entropy(x, t, z_loss=1e-3, softcap=5.0, return_aux=True)
        return loss + aux.z_loss

    explained = torch._dynamo.explain(loss_fn)(logits, target)
    assert explained.graph_break_count == 0
    assert explained.graph_count == 1


# --------------------------------------------------------------------------------------------
# Extremes: finite wherever the exact value is representable, no worse than F.cross_entropy
# --------------------------------------------------------------------------------------------


EXTREMES = [
    ("f32-spikes-1e4", f32, {}),
    ("f32-spikes-1e4", f32, dict(z_loss=1e-4, softcap=30.0)),
    ("f32-spike-3e38", f32, {}),
    ("f16-spikes-6e4", f16, {}),
    ("f16-spikes-6e4", f16, dict(logit_scale=0.125, label_smoothing=0.1)),
    ("bf16-spikes-1e30", bf16, {}),
    ("bf16-spikes-1e30", bf16, dict(label_smoothing=0.1)),
    ("f32-uniform-minus-1e30-rows", f32, {}),
    ("f32-minus-1e30-rows", f32, {}),
    ("bf16-minus-1e30-rows", bf16, {}),
    ("f32-confident", f32, {}),
    ("bf16-confident", bf16, dict(label_smoothing=0.05)),
    ("f16-confident", f16, {}),
]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize(
    "name, dtype, kw", EXTREMES, ids=[f"{n}-{'-'.join(sorted(k)) or 'plain'}" for n, _, k in EXTREMES]
)
def test_extremes(name, dtype, kw, reduction):
    logits, target = extreme_case(name, dtype)
    kw = dict(kw, reduction=reduction)
    out_dtype = output_dtype(dtype)
    upstream = torch.randint(1, 8, target.shape, generator=gen(name)).to(f64) / 4 if reduction == "none" else None
    if upstream is None:
        upstream = torch.tensor(1.0, dtype=f64)

    x = logits.clone().requires_grad_()
    loss = crossent.cross_entropy(x, target, **kw)
    loss.backward(upstream.to(loss.dtype))
    xr = logits.to(f64, copy=True).requires_grad_()
    ref = R.cross_entropy(xr, target, **kw)
    ref.backward(upstream)
    xb = logits.clone().requires_grad_()
    base, _ = torch_at_dtype(xb, target, None, **kw)
    base.backward(upstream.to(base.dtype))

    # finite wherever the exact value is representable in the output dtype
    representable = ref.abs() < torch.finfo(out_dtype).max
    assert bool(representable.all()), "the cases are built to be representable"
    assert torch.isfinite(loss).all(), f"non-finite loss {loss}"
    assert torch.isfinite(x.grad).all()
    for what, ours, exact, theirs, dt in (
        ("loss", loss, ref, base, dtype),
        ("grad", x.grad, xr.grad, xb.grad, dtype),
    ):
        err = rel_error(ours, exact)
        bound = 2 * error_or_inf(theirs, exact) + SLACK[dt]
        assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"
    if name == "f32-uniform-minus-1e30-rows":  # every row is exactly -1e30: the loss is log V
        assert bool((logits == -1e30).all())
        torch.testing.assert_close(loss, torch.full_like(loss, math.log(16)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", BACKENDS)
def test_mean_of_huge_losses_is_finite_when_representable(impl):
    """Two float32 tokens of loss 3e38: the sum (6e38) is not representable, the mean (1e38) is."""
    logits = torch.zeros(6, 5)
    target = torch.zeros(6, dtype=torch.long)
    logits[0, 1] = 3e38  # target 0 scores 3e38 below the best: loss 3e38
    logits[1, 0] = -3e38  # the target itself at -3e38: loss 3e38
    exact = R.cross_entropy(logits.double(), target)
    assert abs(exact.item() - 1e38) < 1e32 and exact.item() < torch.finfo(f32).max
    loss = crossent.cross_entropy(logits, target, impl=impl)
    assert torch.isfinite(loss), f"mean loss {loss.item()} where the exact value is {exact.item():.4e}"
    assert rel_error(loss, exact) <= SLACK[f32]


@pytest.mark.parametrize("impl", BACKENDS)
def test_huge_offsets_keep_log_probabilities_exact(impl):
    """A row of -1e30 + noise (float32): (z_y - m) - log S keeps every digit; lse - z_y keeps none."""
    noise = torch.randn(4, 40, dtype=f64) * 1e23
    logits = (-1e30 + noise).to(f32)
    target = torch.randint(0, 40, (4,))
    with triton_settings(impl, block=16):
        our_loss, our_grad = check_against_reference(impl, logits, target, f32, reduction="none")
    assert bool((our_loss > 0).all())


@pytest.mark.parametrize("dtype", [f32, bf16, f16])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_in_logits_propagate_as_in_pytorch(dtype, bad):
    g = gen(f"nan-{dtype}-{bad}")
    logits = (torch.randn(5, 9, generator=g) * 3).to(dtype)
    logits[2, 4] = bad
    target = torch.randint(0, 9, (5,), generator=g)
    target[2] = 1
    ours = crossent.cross_entropy(logits, target, reduction="none")
    theirs = F.cross_entropy(logits, target, reduction="none")
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    if bad != bad:  # NaN: that token's loss is NaN, the others are finite
        assert bool(torch.isnan(ours[2]))
        keep = torch.arange(5) != 2
        assert torch.isfinite(ours[keep]).all()
    assert bool(torch.isnan(crossent.cross_entropy(logits, target))) == bool(
        torch.isnan(F.cross_entropy(logits, target))
    )
    x = logits.clone().requires_grad_()
    crossent.cross_entropy(x, target, z_loss=1e-3, label_smoothing=0.1).backward()  # never crashes


@pytest.mark.parametrize("impl", BACKENDS)
def test_nan_in_logits_gives_nan_loss_with_every_option(impl):
    logits = torch.randn(4, 7)
    logits[1, 3] = math.nan
    target = torch.tensor([0, 1, 2, 3])
    kw = dict(weight=torch.rand(7) + 0.5, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, logit_scale=0.5)
    assert bool(torch.isnan(crossent.cross_entropy(logits, target, impl=impl, **kw)))
    per_token = crossent.cross_entropy(logits, target, reduction="none", impl=impl, **kw)
    assert bool(torch.isnan(per_token[1])) and torch.isfinite(per_token[[0, 2, 3]]).all()


# --------------------------------------------------------------------------------------------
# Out-of-range targets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize(
    "shape, bad, position, value",
    [
        ((4,), {1: 7, 3: 9}, "(1,)", 7),
        ((4,), {2: -3}, "(2,)", -3),
        ((2, 3), {(0, 2): 5, (1, 0): 6}, "(0, 2)", 5),
    ],
)
def test_out_of_range_target_eager_cpu_raises_index_error(impl, shape, bad, position, value):
    """Eager, CPU tensors (Triton's under the interpreter too): an IndexError naming the first bad
    position and its value, before any kernel runs."""
    V = 5
    logits = torch.randn(*shape, V)
    target = torch.zeros(shape, dtype=torch.long)
    for where, v in bad.items():
        target[where] = v
    pattern = rf"target {value} at position {re.escape(position)}.*\[0, {V}\)"
    with pytest.raises(IndexError, match=pattern):
        crossent.cross_entropy(logits, target, impl=impl)
    with pytest.raises(IndexError, match=pattern):
        crossent.cross_entropy(logits.requires_grad_(), target, reduction="none", label_smoothing=0.1, impl=impl)


@pytest.mark.parametrize("impl", BACKENDS)
def test_ignore_index_outside_range_is_not_an_error(impl):
    logits = torch.randn(3, 5)
    loss = crossent.cross_entropy(logits, torch.tensor([0, 17, 4]), ignore_index=17, reduction="none", impl=impl)
    assert loss[1].item() == 0.0


@pytest.mark.parametrize("bad_value", [7, -3])
def test_out_of_range_target_under_compile_gives_nan(fresh_dynamo, bad_value):
    V = 5
    g = gen(f"oob-compile-{bad_value}")
    logits = torch.randn(4, V, generator=g) * 3
    target = torch.tensor([0, bad_value, 4, -100])
    compiled = torch.compile(crossent.cross_entropy, backend="aot_eager", fullgraph=True)
    x = logits.clone().requires_grad_()
    loss = compiled(x, target, reduction="none")
    loss.sum().backward()  # nothing crashes
    assert bool(torch.isnan(loss[1]))
    valid = torch.tensor([0, 0, 4, -100])
    expect = F.cross_entropy(logits, valid, reduction="none")
    torch.testing.assert_close(loss[[0, 2, 3]], expect[[0, 2, 3]])
    assert torch.isfinite(x.grad[[0, 2, 3]]).all()
    assert bool(torch.isnan(compiled(logits, target)))  # the mean over it is NaN too


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", BACKENDS)
def test_float64_is_served_exactly(impl):
    """float64 inputs are computed in float64 (on the Triton backend they run on the PyTorch one:
    float32 kernel arguments would round ε, s, k)."""
    logits, target, weight = make_inputs(6, 30, f64, seed=12, weighted=True)
    options = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, logit_scale=0.3)
    ours_loss, ours_grad = loss_and_grad(loss_fn(impl), logits, target, torch.ones(()), f64, **options)
    ref_loss, ref_grad = loss_and_grad(R.cross_entropy, logits, target, torch.ones(()), f64, **options)
    assert ours_loss.dtype == f64
    torch.testing.assert_close(ours_loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("impl", BACKENDS)
def test_empty_batch(impl):
    x = torch.randn(0, 10, requires_grad=True)
    loss = crossent.cross_entropy(x, torch.zeros(0, dtype=torch.long), impl=impl)
    loss.backward()
    assert float(loss.detach()) == 0.0 and x.grad.shape == (0, 10)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


def test_module_equals_functional_and_moves_its_weight():
    g = gen("module")
    V = 21
    logits = torch.randn(3, 4, V, generator=g) * 3
    target = torch.randint(0, V, (3, 4), generator=g)
    target[0, 0] = -100
    weight = torch.rand(V, generator=g) + 0.5
    module = crossent.CrossEntropyLoss(label_smoothing=0.1, weight=weight, z_loss=1e-3)
    assert "weight" in dict(module.named_buffers())
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    a = module(x1, target)
    b = crossent.cross_entropy(x2, target, label_smoothing=0.1, weight=weight, z_loss=1e-3)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(x1.grad, x2.grad)

    module.to(f64)
    assert module.weight.dtype == f64
    torch.testing.assert_close(module.weight, weight.double())
    ours = module(logits.double(), target)
    ref = R.cross_entropy(logits.double(), target, label_smoothing=0.1, weight=weight.double(), z_loss=1e-3)
    assert ours.dtype == f64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)

    soft_module = crossent.CrossEntropyLoss(class_weight=weight, reduction="none")
    assert torch.equal(soft_module.weight, weight)
    torch.testing.assert_close(
        soft_module(logits, target), crossent.cross_entropy(logits, target, weight=weight, reduction="none")
    )
