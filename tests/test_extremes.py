"""Edge semantics and extreme inputs, on every path: the PyTorch backend, the Triton kernels under
the interpreter, and linear_cross_entropy (both schedules).

Edge semantics, decided here (docs: the "Edge semantics" paragraph):
- N = 0 (an empty batch): "mean" and "sum" give an exact 0 (PyTorch's "mean" gives NaN), "none"
  an empty tensor of the target's shape; gradients are zero-size (zeros for a classifier weight);
  LossAux counts 0 tokens, weight_sum 0, accuracy 0.
- V = 1: every log-probability is exactly 0, so the cross-entropy part is exactly 0 (with
  smoothing too); z-loss is c·w_y·lse² as everywhere; the gradient is the z-loss's alone;
  entropy 0, accuracy 1.
- ignore_index equal to a real class id: tokens with that target are dropped (loss 0, gradient 0,
  not counted); the class stays in the vocabulary (in the softmax and in label smoothing).
- Soft targets that do not sum to 1 are used as given, as PyTorch does: no normalisation; the
  "mean" divides by the number of rows.
- Class weights 0 on every kept token: the "mean" denominator is 0, so the loss is exactly 0 and
  every gradient exactly 0 (never NaN); "sum" and "none" keep the smoothing term Σ w_j log p_j.
- shift >= T: every position is ignored.
- inplace_backward on logits whose elements overlap in memory (an expanded tensor): the gradient
  must still be right (or the call raises a ValueError naming inplace_backward).

Extremes: the cases of the issue, each with z-loss, smoothing, soft capping and all together; where
the exact (float64) result is representable in the output dtype it must be finite and no worse
than PyTorch at that dtype (DESIGN.md §6 rule); where it overflows, the loss is +inf, never NaN.
NaN and inf in the logits propagate as in PyTorch. Out-of-range targets follow DESIGN.md §3 on
every path.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import reference as R
from helpers import internals
from helpers.common import bf16, f16, f32, f64, gen
from helpers.cross_entropy import error_or_inf, torch_baseline
from judge import SLACK, assert_close_to_reference, rel_error

PATHS = ("torch", "triton", "linear-token", "linear-vocab")
CE_PATHS = ("torch", "triton")


@pytest.fixture
def kernels(monkeypatch):
    """The Triton kernel module with small vocabulary blocks (the online merge runs), restored after."""
    module = internals.triton_cross_entropy()
    monkeypatch.setattr(module, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(module, "GRAD_IN_FORWARD", module.GRAD_IN_FORWARD)
    return module


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run_path(path: str, x: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor | None, **kw):
    """(loss, gradient w.r.t. the (N, V) logits ``x``, aux or None) through one path.

    The linear paths compute the same logits exactly: hidden = I (N, N), weight = xᵀ (V, N), so
    ``hidden @ weight.T = x`` (one nonzero term per sum) and ``∂loss/∂weight = (∂loss/∂x)ᵀ``.
    """
    weight = kw.pop("weight", None)
    if path in CE_PATHS:
        leaf = x.clone().requires_grad_(upstream is not None)
        out = crossent.cross_entropy(leaf, target, weight=weight, impl=path, **kw)
        grad_of = leaf
    else:
        N = x.shape[0]
        hidden = torch.eye(N, dtype=x.dtype)
        w = x.T.contiguous().requires_grad_(upstream is not None)
        schedule = path.split("-")[1]
        out = crossent.linear_cross_entropy(hidden, w, target, class_weight=weight, schedule=schedule, **kw)
        grad_of = w
    loss, aux = out if kw.get("return_aux") else (out, None)
    grad = None
    if upstream is not None:
        loss.backward(upstream.to(loss.dtype))
        grad = grad_of.grad if path in CE_PATHS else grad_of.grad.T
    return loss.detach(), grad, aux


def _needs_kernels(path, request):
    if path == "triton":
        request.getfixturevalue("kernels")


# --------------------------------------------------------------------------------------------
# Edge semantics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=["N0", "B3-T0"])
def test_empty_batch(request, path, reduction, lead):
    _needs_kernels(path, request)
    V = 7
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, return_aux=True)
    target = torch.zeros(lead, dtype=torch.long)
    if path in CE_PATHS:
        x = torch.randn(lead + (V,), requires_grad=True)
        loss, aux = crossent.cross_entropy(x, target, impl=path, **kw)
        grads = {"logits": (x, lead + (V,))}
    else:
        D = 4
        x = torch.randn(lead + (D,), requires_grad=True)
        w = torch.randn(V, D, requires_grad=True)
        b = torch.randn(V, requires_grad=True)
        schedule = path.split("-")[1]
        loss, aux = crossent.linear_cross_entropy(x, w, target, bias=b, schedule=schedule, shift=1, **kw)
        grads = {"hidden": (x, lead + (D,)), "weight": (w, (V, D)), "bias": (b, (V,))}
    assert loss.dtype == f32
    if reduction == "none":
        assert loss.shape == lead
    else:
        assert loss.shape == () and loss.item() == 0.0, f"{reduction} of an empty batch must be exactly 0"
    loss.sum().backward()
    for name, (t, shape) in grads.items():
        assert t.grad is not None and t.grad.shape == shape and t.grad.dtype == t.dtype, name
        assert torch.count_nonzero(t.grad) == 0, f"grad {name} of an empty batch must be 0"
    assert int(aux.n_tokens) == 0 and aux.n_tokens.dtype == torch.int64
    assert float(aux.weight_sum) == 0.0 and float(aux.accuracy) == 0.0
    assert aux.lse.shape == lead and aux.entropy.shape == lead
    for name in ("ce", "z_loss"):
        value = getattr(aux, name)
        assert value.shape == (lead if reduction == "none" else ()) and torch.count_nonzero(value) == 0


@pytest.mark.parametrize("path", CE_PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_soft_targets(request, path, reduction):
    _needs_kernels(path, request)
    x = torch.randn(2, 0, 5, requires_grad=True)
    p = torch.rand(2, 0, 5)
    loss, aux = crossent.cross_entropy(x, p, impl=path, reduction=reduction, z_loss=1e-3, return_aux=True)
    assert loss.shape == ((2, 0) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0  # "mean" divides by N = 0 rows: exactly 0
    loss.sum().backward()
    assert x.grad.shape == x.shape and int(aux.n_tokens) == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [f32, bf16, f16])
def test_v1_without_z_loss_is_exactly_zero(request, path, dtype):
    """V = 1: log p = (z - m) - log S = 0 - log 1 = 0 exactly, with smoothing, cap and scale."""
    _needs_kernels(path, request)
    g = gen(f"v1-{path}-{dtype}")
    x = (torch.randn(6, 1, generator=g) * 3).to(dtype)
    target = torch.zeros(6, dtype=torch.long)
    target[2] = -100
    kw = dict(label_smoothing=0.2, softcap=3.0, logit_scale=2.0, reduction="none", return_aux=True)
    upstream = torch.randint(1, 8, (6,), generator=g).to(f64) / 4
    loss, grad, aux = run_path(path, x, target, upstream, **kw)
    assert torch.count_nonzero(loss) == 0, f"V=1 cross entropy must be exactly 0, got {loss}"
    assert torch.count_nonzero(aux.ce) == 0 and torch.count_nonzero(aux.entropy) == 0
    assert float(aux.accuracy) == 1.0 and int(aux.n_tokens) == 5
    xr = x.to(f64).requires_grad_()
    R.cross_entropy(xr, target, **{k: v for k, v in kw.items() if k != "return_aux"}).backward(upstream)
    assert torch.count_nonzero(xr.grad) == 0
    xb = x.clone().requires_grad_()
    base = torch_baseline(xb, target, **kw)
    base.backward(upstream.to(base.dtype))
    assert_close_to_reference("V=1 grad", grad, xr.grad, xb.grad, dtype)


V1_Z_LOSS = [(p, False) for p in PATHS] + [(p, True) for p in CE_PATHS]  # linear: no soft targets


@pytest.mark.parametrize("path, soft", V1_Z_LOSS, ids=[f"{p}-{'soft' if s else 'hard'}" for p, s in V1_Z_LOSS])
def test_v1_z_loss_gradient(request, path, soft):
    """V = 1 with z-loss: ℓ = c·lse² with lse = z, so ∂ℓ/∂z = 2c·z exactly. Computing it as
    softmax·(1 + 2c·lse) - 1 cancels (1 + 2c·lse rounds to float32 before the 1 is taken off);
    PyTorch's composed expression adds the z-loss gradient to an exact 0 instead."""
    _needs_kernels(path, request)
    x = torch.tensor([[0.5], [-1.25], [3.0], [2.0]])
    target = torch.ones(4, 1) if soft else torch.zeros(4, dtype=torch.long)
    kw = dict(z_loss=1e-4, reduction="sum")
    upstream = torch.tensor(1.0, dtype=f64)
    loss, grad, _ = run_path(path, x, target, upstream, **kw)
    xr = x.to(f64).requires_grad_()
    ref = R.cross_entropy(xr, target.to(f64) if soft else target, **kw)
    ref.backward(upstream)
    torch.testing.assert_close(xr.grad, 2e-4 * x.to(f64), rtol=1e-12, atol=0)  # the exact gradient
    xb = x.clone().requires_grad_()
    base = torch_baseline(xb, target, **kw)
    base.backward()
    assert_close_to_reference("V=1 loss", loss, ref, base, f32)
    assert_close_to_reference("V=1 z-loss grad", grad, xr.grad, xb.grad, f32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ignore_index", [0, 3, 6])
def test_ignore_index_equal_to_a_real_class(request, path, ignore_index):
    """The class stays in the vocabulary (softmax, smoothing); only tokens targeting it are dropped,
    exactly as F.cross_entropy does (checked against it, with smoothing and class weights)."""
    _needs_kernels(path, request)
    g = gen(f"ii-{path}-{ignore_index}")
    N, V = 12, 7
    x = torch.randn(N, V, generator=g) * 3
    target = torch.randint(0, V, (N,), generator=g)
    target[::3] = ignore_index  # some tokens surely target that class
    weight = torch.rand(V, generator=g) + 0.5
    dropped = target == ignore_index
    for reduction in ("mean", "sum", "none"):
        kw = dict(weight=weight, ignore_index=ignore_index, label_smoothing=0.1, reduction=reduction)
        upstream = torch.rand(N, generator=g, dtype=f64) + 0.5 if reduction == "none" else torch.tensor(1.5, dtype=f64)
        loss, grad, aux = run_path(path, x, target, upstream, return_aux=True, **kw)
        xt = x.clone().requires_grad_()
        theirs = F.cross_entropy(xt, target, **kw)
        theirs.backward(upstream.to(f32))
        torch.testing.assert_close(loss, theirs.detach())
        torch.testing.assert_close(grad, xt.grad)
        assert torch.count_nonzero(grad[dropped]) == 0
        assert int(aux.n_tokens) == int((~dropped).sum())
        torch.testing.assert_close(aux.weight_sum, weight[target[~dropped]].sum())
        # the ignored class still receives gradient from the kept tokens' softmax
        assert torch.count_nonzero(grad[~dropped][:, ignore_index]) == int((~dropped).sum())
        # and a mean over the kept tokens alone (the subset) is the same loss
        if reduction == "mean":
            subset, _, _ = run_path(path, x[~dropped], target[~dropped], None, **{**kw, "ignore_index": -100})
            torch.testing.assert_close(loss, subset, rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", CE_PATHS)
def test_soft_targets_not_summing_to_one_are_used_as_given(request, path):
    _needs_kernels(path, request)
    g = gen(f"soft-unnormalised-{path}")
    N, V = 6, 9
    x = torch.randn(N, V, generator=g) * 3
    p = torch.rand(N, V, generator=g) * 2  # rows sum to about V
    p[1] = 0.0  # a zero row: ce 0
    p[2] = p[2] / p[2].sum() * 0.5  # a row summing to 1/2
    weight = torch.rand(V, generator=g) + 0.5
    for reduction in ("mean", "sum", "none"):
        kw = dict(weight=weight, label_smoothing=0.1, reduction=reduction)
        upstream = torch.rand(N, generator=g, dtype=f64) + 0.5 if reduction == "none" else torch.tensor(0.75, dtype=f64)
        loss, grad, _ = run_path(path, x, p, upstream, **kw)
        xt = x.clone().requires_grad_()
        theirs = F.cross_entropy(xt, p, **kw)
        theirs.backward(upstream.to(f32))
        torch.testing.assert_close(loss, theirs.detach())
        torch.testing.assert_close(grad, xt.grad)
    # linearity: twice the target gives twice the cross entropy (z-loss does not scale)
    once, _, _ = run_path(path, x, p, None, reduction="none")
    twice, _, _ = run_path(path, x, 2 * p, None, reduction="none")
    torch.testing.assert_close(twice, 2 * once, rtol=1e-6, atol=0)
    # with z-loss and everything else, against the oracle (the "mean" divides by N rows)
    kw = dict(weight=weight, label_smoothing=0.2, z_loss=1e-2, softcap=4.0, logit_scale=0.7, reduction="mean")
    loss, grad, _ = run_path(path, x, p, torch.tensor(1.0, dtype=f64), **kw)
    xr = x.to(f64).requires_grad_()
    ref = R.cross_entropy(xr, p.to(f64), **{**kw, "weight": weight.to(f64)})
    ref.backward()
    xb = x.clone().requires_grad_()
    base = torch_baseline(xb, p, **kw)
    base.backward()
    assert_close_to_reference("loss", loss, ref, base, f32)
    assert_close_to_reference("grad", grad, xr.grad, xb.grad, f32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_class_weights_zero_on_every_kept_token(request, path, dtype):
    _needs_kernels(path, request)
    g = gen(f"zero-kept-{path}-{dtype}")
    N, V = 10, 8
    x = (torch.randn(N, V, generator=g) * 3).to(dtype)
    target = torch.randint(0, V - 2, (N,), generator=g)
    target[::4] = -100
    weight = torch.rand(V, dtype=f64, generator=g) + 0.5
    weight[target[target != -100]] = 0.0
    weight = weight.to(dtype)
    assert bool((weight > 0).any())
    kept = int((target != -100).sum())
    for reduction in ("mean", "sum", "none"):
        kw = dict(weight=weight, label_smoothing=0.1, z_loss=1e-2, softcap=8.0, reduction=reduction)
        upstream = torch.randint(1, 8, (N,), generator=g).to(f64) / 4
        upstream = upstream if reduction == "none" else torch.tensor(1.25, dtype=f64)
        loss, grad, aux = run_path(path, x, target, upstream, return_aux=True, **kw)
        assert int(aux.n_tokens) == kept and float(aux.weight_sum) == 0.0
        if reduction == "mean":
            assert loss.item() == 0.0 and not math.isnan(loss.item())
            assert torch.count_nonzero(grad) == 0, "a zero denominator gives an exactly zero gradient"
            assert torch.count_nonzero(aux.ce) == 0 and torch.count_nonzero(aux.z_loss) == 0
            continue
        # "sum" / "none": the smoothing term -(ε/V)·Σ_j w_j log p_j remains; w_y = 0 removes the rest
        xr = x.to(f64).requires_grad_()
        ref = R.cross_entropy(xr, target, **{**kw, "weight": weight.to(f64)})
        ref.backward(upstream)
        assert bool((ref != 0).any())
        xb = x.clone().requires_grad_()
        base = torch_baseline(xb, target, **kw)
        base.backward(upstream.to(base.dtype))
        assert_close_to_reference(f"{reduction} loss", loss, ref, base, dtype)
        assert_close_to_reference(f"{reduction} grad", grad, xr.grad, xb.grad, dtype)
        assert torch.count_nonzero(aux.z_loss) == 0  # c·w_y·lse² with w_y = 0


@pytest.mark.parametrize("schedule", ["token", "vocab"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shift_past_the_sequence_ignores_everything(schedule, reduction):
    """shift >= T: no position has a target. The loss (and every gradient) is exactly 0, "none"
    keeps the (B, T) shape — and the oracle must say the same."""
    g = gen(f"shift-past-{schedule}-{reduction}")
    B, T, D, V = 2, 3, 4, 6
    hidden = torch.randn(B, T, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    target = torch.randint(0, V, (B, T), generator=g)
    for shift in (T, T + 2):
        loss = crossent.linear_cross_entropy(
            hidden, weight, target, shift=shift, schedule=schedule, reduction=reduction
        )
        assert loss.shape == ((B, T) if reduction == "none" else ())
        assert torch.count_nonzero(loss) == 0
        loss.sum().backward()
        assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0
        ref = R.linear_cross_entropy(hidden.detach(), weight.detach(), target, shift=shift, reduction=reduction)
        assert ref.shape == loss.shape, f"the oracle gives shape {tuple(ref.shape)} for shift={shift} > T={T}"
        assert torch.count_nonzero(ref) == 0


@pytest.mark.parametrize("path", CE_PATHS)
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_inplace_backward_on_overlapping_logits(request, path, dtype):
    """logits expanded along the batch (stride 0): their elements share memory, so writing the
    gradient into them in place cannot be right. The result must still be the true gradient (a
    fresh gradient tensor), or a ValueError naming inplace_backward — never a silent wrong one."""
    _needs_kernels(path, request)
    g = gen(f"inplace-overlap-{path}-{dtype}")
    B, T, V = 3, 4, 10
    base = (torch.randn(1, T, V, generator=g) * 3).to(dtype)
    target = torch.randint(0, V, (B, T), generator=g)
    leaf = base.clone().requires_grad_()
    logits = (leaf * 1).expand(B, T, V)  # a non-leaf, as a model would produce it
    try:
        loss = crossent.cross_entropy(logits, target, impl=path, inplace_backward=True, z_loss=1e-3)
        loss.backward()
    except ValueError as error:
        assert "inplace_backward" in str(error), str(error)
        return
    xr = base.to(f64).requires_grad_()
    R.cross_entropy(xr.expand(B, T, V), target, z_loss=1e-3).backward()
    xb = base.clone().requires_grad_()
    ref_base = torch_baseline(xb.expand(B, T, V), target, reduction="mean", z_loss=1e-3)
    ref_base.backward()
    assert_close_to_reference("grad (expanded logits, inplace_backward)", leaf.grad, xr.grad, xb.grad, dtype)


# --------------------------------------------------------------------------------------------
# Extremes: finite and no worse than PyTorch where the exact result is representable
# --------------------------------------------------------------------------------------------


def _spikes(dtype, value, g):
    """randn·3 rows with ±value spikes: on the target, off the target, both signs."""
    N, V = 8, 17
    x = torch.randn(N, V, generator=g, dtype=f64) * 3
    t = torch.randint(0, V, (N,), generator=g)
    x[0, 4], t[0] = value, 9  # a huge wrong logit: loss ≈ value
    x[1, 2], t[1] = value, 2  # huge and right: loss ≈ 0
    x[2, 5], t[2] = -value, 1  # a huge negative off the target: no effect
    x[3, 7], t[3] = -value, 7  # the target hugely negative: loss ≈ value
    x[4, :3], t[4] = value, 1  # three equal maxima, one of them the target
    x[5, ::2], x[5, 1::2], t[5] = -value, value, 3  # alternating signs
    return x.to(dtype), t


def _offset_rows(dtype, offset, noise, g):
    """Rows of ``offset + noise``: |m| ≫ log S (the seed's order of operations matters)."""
    x = offset + torch.randn(6, 16, generator=g, dtype=f64) * noise
    return x.to(dtype), torch.randint(0, 16, (6,), generator=g)


def _confident(dtype, big, g):
    x = torch.randn(8, 40, generator=g, dtype=f64) * 3
    t = torch.randint(0, 40, (8,), generator=g)
    rows = torch.arange(8)
    x[rows[:3], t[:3]] = big  # sure and right: loss ≈ 0
    x[rows[3:5], t[3:5]] = -big  # sure and wrong: loss ≈ big
    x[5, (t[5] + 1) % 40] = big  # sure of another class: loss ≈ big
    return x.to(dtype), t


def _uniform(dtype, value, g):
    return torch.full((4, 16), value, dtype=f64).to(dtype), torch.randint(0, 16, (4,), generator=g)


EXTREME_CASES = {
    "f32-spikes-3e38": lambda g: _spikes(f32, 3e38, g),
    "f16-spikes-65504": lambda g: _spikes(f16, 65504.0, g),
    "bf16-spikes-1e30": lambda g: _spikes(bf16, 1e30, g),
    "f32-rows-minus-1e30-noise": lambda g: _offset_rows(f32, -1e30, 1e23, g),
    "bf16-rows-minus-1e30-noise": lambda g: _offset_rows(bf16, -1e30, 3e28, g),
    "f16-rows-minus-6e4-noise": lambda g: _offset_rows(f16, -6e4, 500.0, g),
    "f32-confident": lambda g: _confident(f32, 1e4, g),
    "bf16-confident": lambda g: _confident(bf16, 1e4, g),
    "f16-confident": lambda g: _confident(f16, 6e4, g),
    "f32-uniform-3e38": lambda g: _uniform(f32, 3e38, g),
    "bf16-uniform-minus-1e30": lambda g: _uniform(bf16, -1e30, g),
    "f16-uniform-7": lambda g: _uniform(f16, 7.0, g),
}

EXTREME_OPTIONS = {
    "plain": {},
    "z-loss": dict(z_loss=1e-4),
    "smoothing": dict(label_smoothing=0.1),
    "softcap": dict(softcap=30.0),
    "all": dict(z_loss=1e-4, label_smoothing=0.1, softcap=30.0, logit_scale=0.5, weight="rand"),
}


def _check_extreme(label, dtype, loss, grad, ref, ref_grad, base, base_grad) -> list[str]:
    """The rules for one call; returns what is wrong (empty when all is right)."""
    problems = []
    out_max = torch.finfo(f32).max
    representable = torch.isfinite(ref) & (ref.abs() <= out_max)
    if bool((~representable).any()):
        over = loss[~representable]
        if not bool((over == math.inf).all()):
            problems.append(f"{label}: an exact loss that overflows float32 must be +inf, got {over.tolist()}")
    if bool(representable.any()):
        ours, exact, theirs = loss[representable], ref[representable], base.detach()[representable]
        if not bool(torch.isfinite(ours).all()):
            problems.append(f"{label}: loss not finite where the exact value is representable: {ours.tolist()}")
        else:
            err, bound = rel_error(ours, exact), 2 * error_or_inf(theirs, exact) + SLACK[dtype]
            if not err <= bound:
                problems.append(f"{label}: loss relative error {err:.3e} > {bound:.3e}")
    grad_representable = bool((torch.isfinite(ref_grad) & (ref_grad.abs() <= torch.finfo(dtype).max)).all())
    if grad_representable:
        if not bool(torch.isfinite(grad).all()):
            problems.append(f"{label}: gradient not finite where the exact one is representable")
        else:
            err, bound = rel_error(grad, ref_grad), 2 * error_or_inf(base_grad, ref_grad) + SLACK[dtype]
            if not err <= bound:
                problems.append(f"{label}: gradient relative error {err:.3e} > {bound:.3e}")
    return problems


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(EXTREME_CASES))
def test_extremes(request, path, case):
    _needs_kernels(path, request)
    problems = []
    for option_name, options in EXTREME_OPTIONS.items():
        for reduction in ("none", "mean"):
            g = gen(f"{case}-{option_name}-{reduction}")
            x, target = EXTREME_CASES[case](g)
            dtype = x.dtype
            kw = dict(options, reduction=reduction)
            if kw.get("weight") == "rand":
                kw["weight"] = (torch.rand(x.shape[-1], generator=g) + 0.5).to(dtype)
            weight = kw.get("weight")
            n = target.shape[0]
            upstream = (
                torch.randint(1, 8, (n,), generator=g).to(f64) / 4
                if reduction == "none"
                else torch.tensor(0.75, dtype=f64)
            )
            loss, grad, _ = run_path(path, x, target, upstream, **kw)
            assert loss.dtype == f32 and grad.dtype == dtype
            xr = x.to(f64).requires_grad_()
            ref = R.cross_entropy(xr, target, **{**kw, "weight": None if weight is None else weight.to(f64)})
            ref.backward(upstream)
            xb = x.clone().requires_grad_()
            base = torch_baseline(xb, target, **kw)
            base.backward(upstream.to(base.dtype))
            problems += _check_extreme(
                f"{option_name}/{reduction}", dtype, loss, grad, ref.detach(), xr.grad, base, xb.grad
            )
    assert not problems, f"{case} on {path}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", PATHS)
def test_smoothing_sum_of_huge_logits_does_not_overflow(request, path):
    """Smoothing with a 3e38 spike: ce = 0.9·3e38 + (0.1/17)·16·3e38 ≈ 2.98e38 is representable,
    but Σ_j (z_j - m) over the row (≈ -4.8e39) is not: it must not be formed in float32."""
    _needs_kernels(path, request)
    x = torch.zeros(2, 17)
    x[0, 4] = 3e38
    target = torch.tensor([9, 9])
    loss, _, _ = run_path(path, x, target, None, label_smoothing=0.1, reduction="none")
    ref = R.cross_entropy(x.double(), target, label_smoothing=0.1, reduction="none")
    assert float(ref[0]) < torch.finfo(f32).max
    assert bool(torch.isfinite(loss).all()), f"loss {loss.tolist()} where the exact value is {ref.tolist()}"
    assert rel_error(loss, ref) <= SLACK[f32]


SATURATED = [(p, soft) for p in CE_PATHS for soft in (False, True)] + [("linear-token", False), ("linear-vocab", False)]


@pytest.mark.parametrize("path, soft", SATURATED, ids=[f"{p}-{'soft' if s else 'hard'}" for p, s in SATURATED])
def test_saturated_softcap_gradient(request, path, soft):
    """A small soft cap with a large scale saturates tanh: ∂z/∂x = s·(1 - tanh²(s·x/k)) is then a
    difference of nearly equal numbers. PyTorch (at float32) rounds it once, from a correctly
    rounded tanh; crossent must be no worse than twice that (DESIGN.md §6)."""
    _needs_kernels(path, request)
    g = gen(f"saturated-{path}-{soft}")
    N, V = 128, 3
    x = torch.randn(N, V, generator=g) * 3  # |s·x/k| up to ~50: tanh rounds to ±1 past ~9
    for i, a in enumerate((44.5, 46.0, -47.5, 50.0)):  # exp(-2|a|) is subnormal in float32 here
        x[i, i % V] = a * 0.5 / 3.0
    target = torch.softmax(torch.randn(N, V, generator=g) * 2, -1) if soft else torch.randint(0, V, (N,), generator=g)
    kw = dict(softcap=0.5, logit_scale=3.0, reduction="sum")
    loss, grad, _ = run_path(path, x, target, torch.tensor(1.0, dtype=f64), **kw)
    xr = x.to(f64).requires_grad_()
    ref = R.cross_entropy(xr, target.to(f64) if soft else target, **kw)
    ref.backward()
    xb = x.clone().requires_grad_()
    base = torch_baseline(xb, target, **kw)
    base.backward()
    assert_close_to_reference("loss", loss, ref, base, f32)
    assert_close_to_reference("grad", grad, xr.grad, xb.grad, f32)


@pytest.mark.parametrize("path", PATHS)
def test_entropy_of_confident_rows(request, path):
    """LossAux.entropy of nearly one-hot rows is tiny; −Σ p log p keeps its relative accuracy
    (PyTorch's expression at float32 does); forming it as log S − Σ p (z − m) cancels."""
    _needs_kernels(path, request)
    g = gen(f"entropy-{path}")
    N, V = 8, 10
    x = torch.randn(N, V, generator=g) * 3
    target = torch.randint(0, V, (N,), generator=g)
    kw = dict(logit_scale=-4.0, reduction="none", return_aux=True)
    _, _, aux = run_path(path, x, target, None, **kw)
    _, ref = R.cross_entropy(x.to(f64), target, **kw)
    z = x * -4.0
    theirs = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    assert float(ref.entropy.min()) < 1e-3, "the case has confident rows"
    assert_close_to_reference("entropy", aux.entropy, ref.entropy, theirs, f32)


@pytest.mark.parametrize("path", CE_PATHS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "smoothing"])
def test_masked_classes_give_finite_aux(request, path, smoothing):
    """Classes masked with -inf (a common way to forbid tokens) have p = 0 and add nothing to the
    entropy: e^(z-m)·(z-m) is 0 there, not 0·(-inf) = NaN. The loss and the other aux fields are
    the oracle's; the gradient of a masked class is 0. (Smoothing puts weight on log p = -inf:
    that loss is +inf exactly, as PyTorch's.)"""
    _needs_kernels(path, request)
    g = gen(f"masked-aux-{path}-{smoothing}")
    N, V = 6, 33
    x = torch.randn(N, V, generator=g) * 3
    x[:, 5:9] = -math.inf  # masked for every token
    x[2, 20:] = -math.inf  # and a row masked over its larger part
    target = torch.randint(0, 5, (N,), generator=g)
    kw = dict(label_smoothing=smoothing, z_loss=1e-3, reduction="none", return_aux=True)
    loss, grad, aux = run_path(path, x, target, torch.ones(N, dtype=f64), **kw)
    ref, ref_aux = R.cross_entropy(x.to(f64), target, **kw)
    theirs = F.cross_entropy(x, target, reduction="none", label_smoothing=smoothing)
    if smoothing:
        assert bool((loss == math.inf).all()) and bool((theirs == math.inf).all())
    else:
        assert_close_to_reference("loss", loss, ref, theirs, f32)
        assert torch.count_nonzero(grad[:, 5:9]) == 0 and torch.count_nonzero(grad[2, 20:]) == 0
    assert bool(torch.isfinite(aux.entropy).all()), f"entropy {aux.entropy.tolist()}"
    z = x
    p_log_p = torch.where(torch.softmax(z, -1) > 0, torch.softmax(z, -1) * torch.log_softmax(z, -1), 0.0)
    assert_close_to_reference("entropy", aux.entropy, ref_aux.entropy, -p_log_p.sum(-1), f32)
    assert_close_to_reference("lse", aux.lse, ref_aux.lse, torch.logsumexp(x, -1), f32)


# --------------------------------------------------------------------------------------------
# NaN and inf in the inputs propagate as in PyTorch
# --------------------------------------------------------------------------------------------

BAD_VALUES = {
    "nan": math.nan,
    "+inf": math.inf,
    "-inf": -math.inf,
}


@pytest.mark.parametrize("path", CE_PATHS)
@pytest.mark.parametrize("dtype", [f32, bf16, f16])
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_nan_and_inf_propagate_like_pytorch(request, path, dtype, bad):
    """Per token, the loss is NaN / ±inf exactly where the same formula in PyTorch (at that dtype)
    is, for each option; the other tokens keep their values; nothing raises."""
    _needs_kernels(path, request)
    g = gen(f"bad-{path}-{dtype}-{bad}")
    N, V = 6, 11
    x = (torch.randn(N, V, generator=g) * 3).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    x[1, (target[1] + 1) % V] = BAD_VALUES[bad]  # off the target
    x[3, target[3]] = BAD_VALUES[bad]  # on the target
    x[4, :] = BAD_VALUES[bad]  # the whole row
    for option_name, options in EXTREME_OPTIONS.items():
        kw = dict(options, reduction="none")
        if kw.get("weight") == "rand":
            kw["weight"] = (torch.rand(V, generator=g) + 0.5).to(dtype)
        ours, grad, _ = run_path(path, x, target, torch.ones(N, dtype=f64), **kw)
        xb = x.clone().requires_grad_()
        theirs = torch_baseline(xb, target, **kw)
        theirs = theirs.detach().float()
        where = f"{bad} {option_name}"
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs)), f"{where}: NaN {ours.tolist()} vs {theirs.tolist()}"
        assert torch.equal(torch.isposinf(ours), torch.isposinf(theirs)), f"{where}: +inf {ours} vs {theirs}"
        assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs)), f"{where}: -inf {ours} vs {theirs}"
        clean = torch.ones(N, dtype=torch.bool)
        clean[[1, 3, 4]] = False
        assert torch.isfinite(ours[clean]).all() and torch.isfinite(grad[clean]).all(), where
        if "softcap" not in kw and bad == "nan":
            assert bool(torch.isnan(ours[[1, 3, 4]]).all()), f"{where}: a NaN logit makes its token's loss NaN"
        for reduction in ("mean", "sum"):
            reduced, _, _ = run_path(path, x, target, None, **{**kw, "reduction": reduction})
            expect = torch_baseline(x, target, **{**kw, "reduction": reduction})
            assert bool(torch.isnan(reduced)) == bool(torch.isnan(expect)), f"{where} {reduction}"
            assert bool(torch.isinf(reduced)) == bool(torch.isinf(expect)), f"{where} {reduction}"


@pytest.mark.parametrize("schedule", ["token", "vocab"])
@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
def test_nan_in_linear_inputs_propagates(schedule, where):
    """A NaN in a token's hidden state poisons that token; in a class's weight row or bias, every
    token (each one's softmax sums over that class) — as F.cross_entropy(F.linear(...)) does."""
    g = gen(f"linear-nan-{schedule}-{where}")
    N, D, V = 6, 5, 9
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) / math.sqrt(D)
    bias = torch.randn(V, generator=g)
    target = torch.randint(0, V, (N,), generator=g)
    target[5] = -100
    {"hidden": hidden[2], "weight": weight[4], "bias": bias[4:5]}[where][0] = math.nan
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    ours = crossent.linear_cross_entropy(
        h, w, target, bias=b, schedule=schedule, reduction="none", z_loss=1e-3, label_smoothing=0.1
    )
    theirs = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction="none", label_smoothing=0.1)
    expect_nan = torch.isnan(theirs)
    assert torch.equal(torch.isnan(ours.detach()), expect_nan), f"{ours} vs {theirs}"
    assert bool(expect_nan.any())
    ours.sum().backward()  # never crashes
    total = crossent.linear_cross_entropy(hidden, weight, target, bias=bias, schedule=schedule)
    assert bool(torch.isnan(total))


# --------------------------------------------------------------------------------------------
# Out-of-range targets (DESIGN.md §3) on every path
# --------------------------------------------------------------------------------------------

OUT_OF_RANGE = [(9, "(2,)"), (-7, "(2,)"), (2**40, "(2,)"), (-(2**40), "(2,)")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value, position", OUT_OF_RANGE, ids=[str(v) for v, _ in OUT_OF_RANGE])
def test_out_of_range_target_eager_cpu_raises_index_error(request, path, value, position):
    """Eager, CPU tensors (also impl="triton" under the interpreter): an IndexError naming the
    first bad position and its value, before any kernel runs."""
    _needs_kernels(path, request)
    V = 9
    x = torch.randn(5, V)
    target = torch.tensor([0, -100, value, 3, value + 1 if value > 0 else value - 1])
    pattern = rf"target {value} at position {re.escape(position)}.*\[0, {V}\)"
    with pytest.raises(IndexError, match=pattern):
        run_path(path, x, target, torch.tensor(1.0, dtype=f64), z_loss=1e-3)
    # 2-D: the first bad position in row-major order
    x2, t2 = torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long)
    t2[1, 0], t2[0, 2] = value, value
    with pytest.raises(IndexError, match=rf"target {value} at position \(0, 2\)"):
        if path in CE_PATHS:
            crossent.cross_entropy(x2, t2, impl=path)
        else:
            crossent.linear_cross_entropy(x2, torch.randn(V, V), t2, schedule=path.split("-")[1])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_out_of_range_target_under_compile_gives_nan(request, fresh_dynamo, path, reduction):
    """torch.compile: no host sync, so no error; the bad token's loss (and a reduction over it) is
    NaN, its gradient row NaN, every other token exact; memory out of bounds is never read (ids
    of ±2^40 would fault if used as addresses)."""
    _needs_kernels(path, request)
    g = gen(f"oob-compile-{path}-{reduction}")
    N, V = 6, 9
    x = torch.randn(N, V, generator=g) * 3
    good = torch.randint(0, V, (N,), generator=g)
    good[4] = -100
    bad = good.clone()
    bad[1], bad[3] = 2**40, -(2**40)
    kw = dict(reduction=reduction, z_loss=1e-3, label_smoothing=0.1)

    def fn(x, t):
        return _call(path, x, t, **kw)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    leaf = x.clone().requires_grad_()
    loss = compiled(leaf, bad)
    upstream = torch.ones_like(loss)
    loss.backward(upstream)
    grad = leaf.grad
    if reduction == "mean":
        assert bool(torch.isnan(loss)), f"mean over an out-of-range target must be NaN, got {loss}"
        return
    assert bool(torch.isnan(loss[[1, 3]]).all()), loss
    others = torch.tensor([0, 2, 4, 5])
    assert bool(torch.isfinite(loss[others]).all())
    expect = R.cross_entropy(x.double(), good, **kw)
    torch.testing.assert_close(loss[others].double(), expect[others], rtol=1e-5, atol=1e-6)
    assert bool(torch.isnan(grad[[1, 3]]).all()), "the bad tokens' gradient rows are NaN"
    if path in CE_PATHS:  # (a classifier's gradient sums over tokens: there NaN·0 reaches every row)
        assert bool(torch.isfinite(grad[others]).all())


def _call(path, x, t, **kw):
    """The loss of logits ``x`` through ``path`` (traceable: no backward, no host reads)."""
    if path in CE_PATHS:
        return crossent.cross_entropy(x, t, impl=path, **kw)
    N = x.shape[0]
    return crossent.linear_cross_entropy(
        torch.eye(N, dtype=x.dtype), x.T, t, schedule=path.split("-")[1], **kw
    )  # hidden = I, weight = xᵀ: the logits are x itself
