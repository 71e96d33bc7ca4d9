"""The float64 oracle against F.cross_entropy, and its own invariants (DESIGN.md §1, §6)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from crossent import reference as R

f64 = torch.float64


def _inputs(N, V, *, ignore_fraction=0.0, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=f64) * 3
    target = torch.randint(0, V, (N,), generator=g)
    drop = torch.rand(N, generator=g) < ignore_fraction
    target[drop] = ignore_index
    return logits, target


def _both(logits, target, **kw):
    """(reference, F.cross_entropy) loss and gradient, float64."""
    out = []
    for fn in (R.cross_entropy, F.cross_entropy):
        x = logits.clone().requires_grad_()
        loss = fn(x, target, **kw)
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=f64) + 0.5
        (loss * upstream).sum().backward()
        out.append((loss.detach(), x.grad))
    return out


GRID = [  # (V, reduction, weighted, smoothing, soft, ignore_fraction, ignore_index): pairwise-ish
    (5, "mean", False, 0.0, False, 0.0, -100),
    (5, "sum", True, 0.1, False, 0.2, -100),
    (127, "none", True, 0.0, False, 0.2, 3),  # a real class id as ignore_index
    (127, "mean", True, 0.3, False, 0.2, -100),
    (33, "mean", False, 0.2, True, 0.0, -100),
    (33, "sum", True, 0.0, True, 0.0, -100),
    (33, "none", True, 0.1, True, 0.0, -100),
    (1000, "sum", False, 0.05, False, 0.5, 7),
    (1, "mean", False, 0.0, False, 0.2, -100),
]


@pytest.mark.parametrize("V, reduction, weighted, eps, soft, ignore_fraction, ignore_index", GRID)
def test_reference_equals_torch_in_float64(V, reduction, weighted, eps, soft, ignore_fraction, ignore_index):
    N = 17
    logits, target = _inputs(N, V, ignore_fraction=ignore_fraction, ignore_index=ignore_index, seed=V)
    if soft:
        target = torch.softmax(torch.randn(N, V, dtype=f64), -1)
    weight = torch.rand(V, dtype=f64) + 0.5 if weighted else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=eps)
    if not soft:
        kw["ignore_index"] = ignore_index
    (ours, our_grad), (theirs, their_grad) = _both(logits, target, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-10, atol=1e-12)


def test_all_ignored_gives_zero_where_torch_gives_nan():
    logits, _ = _inputs(6, 11)
    target = torch.full((6,), -100)
    x = logits.clone().requires_grad_()
    loss = R.cross_entropy(x, target)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    assert math.isnan(F.cross_entropy(logits, target).item())


def test_zero_class_weights_on_every_kept_token_give_zero():
    logits, target = _inputs(6, 11)
    weight = torch.ones(11, dtype=f64)
    weight[target] = 0.0
    x = logits.clone().requires_grad_()
    loss = R.cross_entropy(x, target, weight=weight, label_smoothing=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("V", [3, 50, 4099])
def test_shift_invariance(V):
    logits, target = _inputs(9, V, ignore_fraction=0.2, seed=V)
    base = R.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    shifted = R.cross_entropy(logits + 123.456, target, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(shifted, base, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("V", [1, 2, 1000, 65537])
def test_uniform_logits_give_log_v(V):
    logits = torch.full((3, V), 2.5, dtype=f64)
    loss = R.cross_entropy(logits, torch.tensor([0, V // 2, V - 1]))
    assert abs(loss.item() - math.log(V)) < 1e-12


def test_masked_equals_subset():
    logits, target = _inputs(20, 31, seed=3)
    weight = torch.rand(31, dtype=f64) + 0.1
    masked = target.clone()
    masked[::3] = -100
    kept = masked != -100
    for reduction in ("mean", "sum"):
        full = R.cross_entropy(logits, masked, weight=weight, reduction=reduction, z_loss=1e-2)
        subset = R.cross_entropy(logits[kept], target[kept], weight=weight, reduction=reduction, z_loss=1e-2)
        torch.testing.assert_close(full, subset, rtol=1e-12, atol=0)


def test_z_loss_is_c_lse_squared():
    logits, target = _inputs(7, 40, seed=5)
    weight = torch.rand(40, dtype=f64) + 0.5
    c = 3e-3
    with_z, aux = R.cross_entropy(logits, target, weight=weight, z_loss=c, reduction="none", return_aux=True)
    without = R.cross_entropy(logits, target, weight=weight, reduction="none")
    by_hand = c * weight[target] * torch.logsumexp(logits, -1) ** 2
    torch.testing.assert_close(with_z - without, by_hand, rtol=1e-12, atol=0)
    torch.testing.assert_close(aux.z_loss, by_hand, rtol=1e-12, atol=0)


def test_softcap_and_scale_are_applied_scale_first():
    logits, target = _inputs(5, 9, seed=6)
    s, k = 0.5, 2.0
    capped = k * torch.tanh(s * logits / k)
    torch.testing.assert_close(
        R.cross_entropy(logits, target, softcap=k, logit_scale=s),
        F.cross_entropy(capped, target),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize(
    "row, t",
    [
        ([1e4, -1e4, 0.0, 5.0], 0),
        ([1e4, -1e4, 0.0, 5.0], 2),
        ([65504.0, 65000.0, -65504.0], 1),
    ],
)
def test_extreme_rows_match_torch(row, t):
    logits = torch.tensor([row], dtype=f64)
    target = torch.tensor([t])
    ours, theirs = R.cross_entropy(logits, target), F.cross_entropy(logits, target)
    assert abs(ours.item() - theirs.item()) <= 1e-12 * max(1.0, abs(theirs.item()))


@pytest.mark.parametrize("noise_scale", [1.0, 1e15])
def test_minus_1e30_rows_keep_their_information(noise_scale):
    # scale 1: the noise is below ulp(1e30) (~1.4e14), the rows are uniform and the loss is log V;
    # scale 1e15: the differences survive and set the loss
    logits = -1e30 + torch.randn(2, 16, dtype=f64) * noise_scale
    target = torch.tensor([3, 11])
    ours = R.cross_entropy(logits, target, reduction="none")
    theirs = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    if noise_scale == 1.0:
        torch.testing.assert_close(ours, torch.full((2,), math.log(16), dtype=f64), rtol=1e-12, atol=0)
        naive = torch.logsumexp(logits, -1) - logits.gather(-1, target[:, None]).squeeze(-1)
        assert bool((naive == 0).all())  # lse − x_t cancels to nothing here


def test_every_intermediate_is_float64():
    logits = torch.randn(3, 5, dtype=torch.float16)  # a 16-bit input is upcast, never computed in place
    loss = R.cross_entropy(logits, torch.tensor([0, 1, 2]), label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    assert loss.dtype == f64
    with pytest.raises(AssertionError, match="not float64"):
        R.log_softmax_pair(torch.randn(2, 3))


def test_out_of_range_target_raises_index_error():
    with pytest.raises(IndexError, match="outside"):
        R.cross_entropy(torch.randn(2, 3, dtype=f64), torch.tensor([0, 3]))


@pytest.mark.parametrize("shift, reduction", list(itertools.product([0, 1, 2], ["mean", "none"])))
def test_linear_reference_shift(shift, reduction):
    hidden = torch.randn(2, 6, 4, dtype=f64)
    weight = torch.randn(9, 4, dtype=f64)
    target = torch.randint(0, 9, (2, 6))
    loss = R.linear_cross_entropy(hidden, weight, target, shift=shift, reduction=reduction)
    T = 6
    logits = (hidden @ weight.T)[:, : T - shift]
    expect = F.cross_entropy(logits.reshape(-1, 9), target[:, shift:].reshape(-1), reduction=reduction)
    if reduction == "none":
        assert loss.shape == (2, 6)
        assert torch.count_nonzero(loss[:, T - shift :]) == 0
        loss = loss[:, : T - shift].reshape(-1)
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=0)


def test_explain_matches_seed_figures():
    from crossent.seed import SEED_LOGITS, SEED_TARGETS

    trace = R.explain(torch.tensor(SEED_LOGITS), torch.tensor(SEED_TARGETS))
    torch.testing.assert_close(trace.row_max, torch.tensor([3.1, 2.9, 4.2], dtype=f64))
    assert [round(float(v), 4) for v in trace.row_sums] == [1.8477, 1.6632, 1.9228]
    assert [round(float(v), 4) for v in trace.losses] == [0.6139, 0.5087, 0.6538]
    assert round(float(trace.mean), 4) == round(float(trace.torch_loss), 4) == 0.5922
    assert "M = 3.1000, 2.9000, 4.2000" in str(trace)
