"""crossent.cross_entropy against the float64 oracle, F.cross_entropy and its own invariants.

DESIGN.md §1 (the math), §2 (the API), §3 (out-of-range targets), §6 (the tolerance rule and the
test grids). Every expected value here comes from ``crossent.reference`` (float64) or from plain
PyTorch, never from crossent itself.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import reference as R
from judge import SLACK, assert_close_to_reference, rel_error

f64 = torch.float64
f32 = torch.float32
f16 = torch.float16
bf16 = torch.bfloat16
DTYPES = (f16, bf16, f32, f64)


def _gen(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return f64 if dtype == f64 else f32


# --------------------------------------------------------------------------------------------
# The grid of DESIGN.md §6: explicit cases, chosen for pairwise coverage
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    V: int = 127
    lead: tuple = (13,)  # leading dims: (N,) or (B, T)
    layout: str = "contig"  # contig | slice (rows of a wider tensor) | transpose (B,T swapped) | shift ([:, :-1])
    dtype: torch.dtype = f32
    reduction: str = "mean"
    weight: str | None = None  # None | "rand" | "zero_kept" (0 on every kept target)
    eps: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    scale: float = 1.0
    soft: bool = False
    ignore: float = 0.0  # fraction of tokens set to ignore_index
    ignore_index: int = -100
    upstream: str = "random"  # "unit", or "random": per token for "none", a scalar != 1 otherwise
    chunk: int | None = None
    inplace: bool = False
    aux: bool = False


BT = (3, 5)
ALL = dict(weight="rand", eps=0.1, z_loss=1e-3, softcap=10.0, scale=0.5)  # every option at once

GRID = [
    # --- every dtype meets every reduction, with the layouts and chunk sizes spread over them
    Case("f32-mean-V5-plain-unit", V=5, upstream="unit"),  # the common loss.backward()
    Case("f32-sum-BT-transpose-chunk7", lead=BT, layout="transpose", reduction="sum", chunk=7),
    Case("f32-none-slice-chunk1-ignore20", layout="slice", reduction="none", chunk=1, ignore=0.2),
    Case("f16-mean-BT-shift-ignore20", lead=BT, layout="shift", dtype=f16, ignore=0.2),
    Case("f16-sum-slice-chunk7-weight", layout="slice", dtype=f16, reduction="sum", chunk=7, weight="rand"),
    Case("f16-none-chunk1-eps", dtype=f16, reduction="none", chunk=1, eps=0.1),
    Case("bf16-mean-slice-zloss", layout="slice", dtype=bf16, z_loss=1e-2),
    Case("bf16-sum-BT-softcap-chunk7", lead=BT, dtype=bf16, reduction="sum", softcap=5.0, chunk=7),
    Case(
        "bf16-none-BT-transpose-weight-ignore20",
        lead=BT,
        layout="transpose",
        dtype=bf16,
        reduction="none",
        weight="rand",
        ignore=0.2,
    ),
    Case("f64-mean-BT-transpose-chunk1-scale", lead=BT, layout="transpose", dtype=f64, chunk=1, scale=0.25),
    Case("f64-sum-ignore20", dtype=f64, reduction="sum", ignore=0.2),
    Case("f64-none-BT-shift-eps", lead=BT, layout="shift", dtype=f64, reduction="none", eps=0.2),
    # --- each option alone (float32, V=127)
    Case("alone-weight-sum-unit", reduction="sum", weight="rand", upstream="unit"),
    Case("alone-eps-none", reduction="none", eps=0.2),
    Case("alone-zloss-mean", z_loss=1e-2),
    Case("alone-softcap-mean", softcap=5.0),
    Case("alone-scale-sum", reduction="sum", scale=0.125),
    Case("alone-negative-scale-none", reduction="none", scale=-0.5),
    # --- all options combined, at each dtype (with LossAux)
    Case("all-f32-mean-BT-slice-chunk7", lead=BT, layout="slice", chunk=7, ignore=0.2, aux=True, **ALL),
    Case("all-f16-none-chunk1", dtype=f16, reduction="none", chunk=1, ignore=0.2, aux=True, **ALL),
    Case("all-bf16-sum-BT-shift", lead=BT, layout="shift", dtype=bf16, reduction="sum", aux=True, **ALL),
    Case(
        "all-f64-mean-BT-transpose-ii3",
        lead=BT,
        layout="transpose",
        dtype=f64,
        chunk=7,
        ignore=0.2,
        ignore_index=3,
        aux=True,
        **ALL,
    ),
    # --- soft targets: plain, with smoothing, with weights, with everything
    Case("soft-f32-mean-unit", soft=True, upstream="unit"),
    Case("soft-bf16-sum-slice-eps", soft=True, layout="slice", dtype=bf16, reduction="sum", eps=0.1),
    Case("soft-f16-none-weight", soft=True, dtype=f16, reduction="none", weight="rand"),
    Case("soft-f64-mean-BT-transpose-all", soft=True, lead=BT, layout="transpose", dtype=f64, aux=True, **ALL),
    Case("soft-f64-sum-all-chunk7", soft=True, dtype=f64, reduction="sum", chunk=7, aux=True, **ALL),
    Case(
        "soft-f32-none-BT-shift-eps-weight-chunk1",
        soft=True,
        lead=BT,
        layout="shift",
        reduction="none",
        eps=0.1,
        weight="rand",
        chunk=1,
        aux=True,
    ),
    # --- ignore_index: a real class id, and everything ignored (the "mean" denominator is 0)
    Case("ii3-f32-none-eps-weight", reduction="none", ignore=0.2, ignore_index=3, eps=0.1, weight="rand"),
    Case("ignore100-f32-mean-weight-zloss", ignore=1.0, weight="rand", z_loss=1e-3),
    Case("ignore100-f16-sum", dtype=f16, reduction="sum", ignore=1.0),
    Case("ignore100-bf16-none-BT-aux", lead=BT, dtype=bf16, reduction="none", ignore=1.0, aux=True),
    Case("ignore100-f64-mean-ii0-eps", dtype=f64, ignore=1.0, ignore_index=0, eps=0.1),
    # --- class weights that are 0 on every kept token: the "mean" denominator is 0
    Case("zero-kept-f32-mean-eps-zloss", weight="zero_kept", ignore=0.2, eps=0.1, z_loss=1e-3),
    Case("zero-kept-bf16-mean-BT-aux", lead=BT, dtype=bf16, weight="zero_kept", aux=True),
    # --- small and odd V
    Case("V1-f32-mean", V=1),
    Case("V1-f16-none-eps-zloss", V=1, dtype=f16, reduction="none", eps=0.1, z_loss=1e-2),
    Case("V1-soft-bf16-sum", V=1, soft=True, dtype=bf16, reduction="sum"),
    Case("V1-f64-none-BT-softcap-scale", V=1, lead=BT, dtype=f64, reduction="none", softcap=2.0, scale=3.0),
    Case("V5-bf16-mean-chunk1-ignore20", V=5, dtype=bf16, chunk=1, ignore=0.2),
    # --- large V, few rows
    Case("V32000-f32-mean-weight-ignore20", V=32000, lead=(6,), weight="rand", ignore=0.2),
    Case("V32000-bf16-none-BT-slice-eps", V=32000, lead=(2, 3), layout="slice", dtype=bf16, reduction="none", eps=0.1),
    Case(
        "V32000-f16-sum-zloss-softcap-chunk7",
        V=32000,
        lead=(2, 5),
        dtype=f16,
        reduction="sum",
        z_loss=1e-4,
        softcap=30.0,
        chunk=7,
    ),
    Case("V128256-f32-sum-all-aux", V=128256, lead=(3,), reduction="sum", aux=True, **ALL),
    Case("V128256-bf16-mean-weight-chunk1", V=128256, lead=(3,), dtype=bf16, weight="rand", chunk=1),
    # --- inplace_backward=True: the gradient lands in the logits' storage
    Case("inplace-f32-mean-unit", inplace=True, upstream="unit"),
    Case("inplace-bf16-none-slice-eps", layout="slice", dtype=bf16, reduction="none", eps=0.1, inplace=True),
    Case("inplace-f16-sum-soft-chunk7", soft=True, dtype=f16, reduction="sum", chunk=7, inplace=True),
    Case(
        "inplace-f64-mean-BT-transpose-all-chunk1",
        lead=BT,
        layout="transpose",
        dtype=f64,
        chunk=1,
        ignore=0.2,
        inplace=True,
        **ALL,
    ),
    Case("inplace-f32-mean-ignore100", ignore=1.0, inplace=True),
    Case("inplace-V32000-bf16-mean-shift", V=32000, lead=(2, 2), layout="shift", dtype=bf16, inplace=True, z_loss=1e-4),
]


def make_logits(case: Case, g: torch.Generator):
    """(base tensor, view) such that ``view(base)`` is the (lead..., V) logits of ``case``."""
    V, lead = case.V, case.lead
    if case.layout == "contig":
        shape, view = lead + (V,), lambda t: t
    elif case.layout == "slice":
        shape, view = lead + (V + 5,), lambda t: t[..., 2 : V + 2]
    elif case.layout == "transpose":
        B, T = lead
        shape, view = (T, B, V), lambda t: t.transpose(0, 1)
    elif case.layout == "shift":
        B, T = lead
        shape, view = (B, T + 1, V), lambda t: t[:, :-1]
    else:
        raise AssertionError(case.layout)
    gen_dtype = f64 if case.dtype == f64 else f32
    base = (torch.randn(shape, generator=g, dtype=gen_dtype) * 3).to(case.dtype)
    return base, view


def make_target(case: Case, g: torch.Generator):
    lead, V = case.lead, case.V
    if case.soft:
        p = torch.softmax(torch.randn(lead + (V,), generator=g, dtype=f64) * 2, -1)
        return p.to(case.dtype)
    target = torch.randint(0, V, lead, generator=g)
    n = math.prod(lead)
    n_ignored = round(case.ignore * n)
    drop = torch.randperm(n, generator=g)[:n_ignored]
    target.view(-1)[drop] = case.ignore_index
    return target


def make_weight(case: Case, target: torch.Tensor, g: torch.Generator):
    if case.weight is None:
        return None
    w = torch.rand(case.V, generator=g, dtype=f64) + 0.5
    if case.weight == "zero_kept":
        kept = target[target != case.ignore_index]
        w[kept] = 0.0
        assert bool((w > 0).any()), "the weights must not all be zero"
    return w.to(case.dtype)


def make_upstream(case: Case, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    """Exactly representable in every dtype (multiples of 1/4 up to 7/4)."""
    if case.upstream == "unit":
        return torch.ones(shape, dtype=f64)
    if case.reduction == "none":
        return torch.randint(1, 8, shape, generator=g).to(f64) / 4
    return torch.tensor(0.75, dtype=f64)


def option_kwargs(case: Case) -> dict:
    kw = dict(
        reduction=case.reduction,
        label_smoothing=case.eps,
        z_loss=case.z_loss,
        softcap=case.softcap,
        logit_scale=case.scale,
    )
    if not case.soft:
        kw["ignore_index"] = case.ignore_index
    return kw


def torch_at_dtype(
    x,
    target,
    weight=None,
    *,
    reduction,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    logit_scale=1.0,
):
    """The same formula in plain PyTorch at the input's dtype: F.cross_entropy where it has the
    option, the composed expression (scale, tanh cap, F.cross_entropy + c·w_y·logsumexp²) where
    not. Returns (loss, dict of the LossAux quantities)."""
    V = x.shape[-1]
    lead = x.shape[:-1]
    z = x
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z2 = z.reshape(-1, V)
    N = z2.shape[0]
    soft = target.is_floating_point()
    if soft:
        t2 = target.reshape(-1, V)
        ce = F.cross_entropy(z2, t2, weight=weight, reduction="none", label_smoothing=label_smoothing)
        keep = torch.ones(N, dtype=torch.bool)
        w_y = torch.ones(N, dtype=x.dtype)  # soft targets: c·lse², no class weight
        denominator = torch.tensor(float(N), dtype=x.dtype)
        target_class = t2.argmax(-1)
    else:
        t2 = target.reshape(-1)
        ce = F.cross_entropy(
            z2, t2, weight=weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
        )
        keep = t2 != ignore_index
        y = torch.where(keep, t2, 0)
        w_y = torch.ones(N, dtype=x.dtype) if weight is None else weight[y]
        w_y = torch.where(keep, w_y, torch.zeros_like(w_y))
        denominator = w_y.sum()
        target_class = y
    lse = torch.logsumexp(z2, -1)
    zl = z_loss * w_y * lse * lse if z_loss != 0.0 else torch.zeros_like(ce)
    zl = torch.where(keep, zl, torch.zeros_like(zl))

    def reduce(t):
        if reduction == "none":
            return t.reshape(lead)
        total = t.sum()
        if reduction == "sum":
            return total
        safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        return torch.where(denominator != 0, total / safe, torch.zeros_like(total))

    plain = z_loss == 0.0 and softcap is None and logit_scale == 1.0
    if plain and reduction != "none" and bool(denominator != 0):
        kw = {} if soft else {"ignore_index": ignore_index}
        loss = F.cross_entropy(z2, t2, weight=weight, reduction=reduction, label_smoothing=label_smoothing, **kw)
    else:
        loss = reduce(ce + zl)
    with torch.no_grad():
        n_tokens = keep.sum()
        correct = ((z2.argmax(-1) == target_class) & keep).sum().to(x.dtype)
        aux = dict(
            ce=reduce(ce.detach()),
            z_loss=reduce(zl.detach()),
            lse=lse.detach().reshape(lead),
            entropy=-(torch.softmax(z2, -1) * torch.log_softmax(z2, -1)).sum(-1).reshape(lead),
            n_tokens=n_tokens,
            weight_sum=denominator.detach(),
            accuracy=correct / n_tokens.clamp(min=1),
        )
    return loss, aux


def check_aux(case_id, aux, ref_aux, base_aux, dtype, lead):
    assert isinstance(aux, crossent.LossAux)
    out = _output_dtype(dtype)
    for name in ("ce", "z_loss", "lse", "entropy", "weight_sum", "accuracy", "n_tokens"):
        value = getattr(aux, name)
        assert not value.requires_grad, f"{case_id}: aux.{name} is not detached"
    assert aux.lse.shape == lead and aux.entropy.shape == lead
    assert aux.lse.dtype == out and aux.entropy.dtype == out
    assert aux.n_tokens.dtype == torch.int64 and aux.n_tokens.dim() == 0
    assert aux.weight_sum.dtype == f32 and aux.weight_sum.dim() == 0
    assert aux.accuracy.dtype == f32 and aux.accuracy.dim() == 0
    assert int(aux.n_tokens) == int(ref_aux.n_tokens)
    for name in ("ce", "z_loss", "lse", "entropy", "weight_sum", "accuracy"):
        # weight_sum and accuracy are float32 by contract (DESIGN.md §2), also for float64 inputs
        rule_dtype = f32 if name in ("weight_sum", "accuracy") and dtype == f64 else dtype
        assert_close_to_reference(
            f"{case_id} aux.{name}", getattr(aux, name), getattr(ref_aux, name), base_aux[name], rule_dtype
        )


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in GRID])
def test_grid_against_reference(case: Case):
    g = _gen(case.id)
    base, view = make_logits(case, g)
    target = make_target(case, g)
    weight = make_weight(case, target, g)
    kw = option_kwargs(case)

    # crossent
    leaf = base.clone().requires_grad_()
    x = view(leaf * 1 if case.inplace else leaf)
    if case.layout != "contig":
        assert not x.is_contiguous()
    x_values = x.detach().clone()
    seen = []
    x.register_hook(seen.append)
    out = crossent.cross_entropy(
        x, target, weight=weight, chunk_size=case.chunk, inplace_backward=case.inplace, return_aux=case.aux, **kw
    )
    loss, aux = out if case.aux else (out, None)
    assert loss.dtype == _output_dtype(case.dtype)
    assert loss.shape == (case.lead if case.reduction == "none" else ())
    upstream = make_upstream(case, loss.shape, g)
    loss.backward(upstream.to(loss.dtype))
    grad = view(leaf.grad)
    assert grad.dtype == case.dtype and grad.shape == x.shape
    if case.layout == "slice":  # the columns outside the view get nothing
        outside = leaf.grad.clone()
        view(outside).zero_()
        assert torch.count_nonzero(outside) == 0
    if case.inplace:
        (written,) = seen
        assert written.data_ptr() == x.data_ptr() and written.stride() == x.stride(), "gradient not in place"

    # the float64 oracle
    xr = x_values.to(f64, copy=True).requires_grad_()
    ref_out = R.cross_entropy(xr, target, weight=None if weight is None else weight.to(f64), return_aux=case.aux, **kw)
    ref_loss, ref_aux = ref_out if case.aux else (ref_out, None)
    ref_loss.backward(upstream)

    # plain PyTorch at the input dtype
    xb = x_values.clone().requires_grad_()
    base_loss, base_aux = torch_at_dtype(xb, target, weight, **kw)
    base_loss.backward(upstream.to(base_loss.dtype))

    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close_to_reference(f"{case.id} loss", loss, ref_loss, base_loss, case.dtype)
    assert_close_to_reference(f"{case.id} grad", grad, xr.grad, xb.grad, case.dtype)
    if not case.soft:  # an ignored token contributes exactly 0 and gets exactly 0
        ignored = target == case.ignore_index
        assert torch.count_nonzero(grad[ignored]) == 0
        if case.reduction == "none":
            assert torch.count_nonzero(loss[ignored]) == 0
    if case.reduction == "mean" and not case.soft and _denominator(target, weight, case.ignore_index) == 0.0:
        assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0, "zero denominator must give exact zeros"
    if case.ignore == 1.0:
        assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0
    if case.aux:
        check_aux(case.id, aux, ref_aux, base_aux, case.dtype, case.lead)


def _denominator(target, weight, ignore_index) -> float:
    keep = target != ignore_index
    if weight is None:
        return float(keep.sum())
    return float(weight.to(f64)[target[keep]].sum())


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
    g = _gen(f"drop-in-{name}-{reduction}")
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
    g = _gen("class-dim-last")
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
    g = _gen(f"16bit-{dtype}")
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


@pytest.mark.parametrize("how", ["all-ignored", "zero-class-weights"])
def test_difference_zero_denominator_gives_zero_not_nan(how):
    g = _gen(how)
    logits = torch.randn(8, 9, generator=g) * 3
    target = torch.randint(0, 9, (8,), generator=g)
    weight = None
    if how == "all-ignored":
        target[:] = -100
    else:
        weight = torch.rand(9, generator=g) + 0.5
        weight[target] = 0.0
    assert math.isnan(F.cross_entropy(logits, target, weight=weight).item())
    x = logits.clone().requires_grad_()
    loss = crossent.cross_entropy(x, target, weight=weight)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------


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
    g = _gen(f"shift-{sorted(kw)}")
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
        assert loss.dtype == _output_dtype(dtype)
        assert abs(loss.item() - math.log(V)) <= 1e-6 * max(1.0, math.log(V)), (eps, loss.item())
    x = logits.clone().requires_grad_()
    crossent.cross_entropy(x, target).backward()
    expected = torch.full((3, V), 1.0 / V, dtype=f64) / 3
    expected[torch.arange(3), target] -= 1.0 / 3
    torch.testing.assert_close(x.grad.to(f64), expected, rtol=0, atol=1e-2 if dtype in (f16, bf16) else 1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [f32, f64])
def test_masked_equals_subset(reduction, dtype):
    g = _gen(f"masked-{reduction}-{dtype}")
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
    g = _gen(f"gradcheck-{name}-{reduction}")
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
    g = _gen("gradcheck-compiled")
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


@pytest.mark.parametrize("upstream", [1.0, 2.5])
def test_second_backward_through_a_retained_graph(upstream):
    """A retained graph can be differentiated twice, with the same result (the torch_impl docstring
    promises a recomputation then); gradcheck relies on it."""
    g = _gen(f"retain-{upstream}")
    logits = torch.randn(4, 9, generator=g, dtype=f64) * 3
    target = torch.tensor([0, 8, -100, 3])
    x = logits.clone().requires_grad_()
    loss = crossent.cross_entropy(x, target, label_smoothing=0.1, z_loss=1e-2)
    u = torch.tensor(upstream, dtype=f64)
    (first,) = torch.autograd.grad(loss, x, u, retain_graph=True)
    first = first.clone()
    (second,) = torch.autograd.grad(loss, x, u)
    xr = logits.clone().requires_grad_()
    R.cross_entropy(xr, target, label_smoothing=0.1, z_loss=1e-2).backward(u)
    torch.testing.assert_close(first, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, xr.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_identical_calls_give_identical_bits(dtype):
    g = _gen(f"bits-{dtype}")
    N, V = 64, 1000
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[::5] = -100
    weight = (torch.rand(V, generator=g) + 0.5).to(dtype)
    kw = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=20.0, logit_scale=0.9)
    runs = []
    for _ in range(2):
        for reduction in ("mean", "none"):
            x = logits.clone().requires_grad_()
            loss = crossent.cross_entropy(x, target, reduction=reduction, **kw)
            loss.sum().backward()
            runs.append((reduction, loss.detach(), x.grad))
    for (r1, l1, g1), (r2, l2, g2) in zip(runs[:2], runs[2:], strict=True):
        assert r1 == r2
        assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_aux_against_reference(reduction):
    g = _gen(f"aux-{reduction}")
    B, T, V = 3, 7, 19
    logits = torch.randn(B, T, V, generator=g) * 3
    target = torch.randint(0, V, (B, T), generator=g)
    target[0, :3] = -100
    # make some tokens right for sure, so accuracy is neither 0 nor 1 by chance
    logits[1, :4] = -5.0
    logits[1, torch.arange(4), target[1, :4]] = 5.0
    weight = torch.rand(V, generator=g) + 0.5
    kw = dict(weight=weight, reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=15.0, logit_scale=1.3)
    loss, aux = crossent.cross_entropy(logits, target, return_aux=True, **kw)
    ref_loss, ref = R.cross_entropy(logits.double(), target, return_aux=True, **{**kw, "weight": weight.double()})
    base_loss, base = torch_at_dtype(logits, target, **kw)
    assert 0.0 < float(ref.accuracy) < 1.0
    check_aux(f"aux-{reduction}", aux, ref, base, f32, (B, T))
    assert_close_to_reference("loss", loss, ref_loss, base_loss, f32)
    torch.testing.assert_close(aux.ce + aux.z_loss, loss)  # the parts add up to the loss


def test_loss_aux_soft_targets_and_no_z_loss():
    g = _gen("aux-soft")
    N, V = 9, 12
    logits = torch.randn(N, V, generator=g) * 3
    target = torch.softmax(torch.randn(N, V, generator=g) * 3, -1)
    loss, aux = crossent.cross_entropy(logits, target, return_aux=True)
    _, ref = R.cross_entropy(logits.double(), target, return_aux=True)
    _, base = torch_at_dtype(logits, target, None, reduction="mean")
    check_aux("aux-soft", aux, ref, base, f32, (N,))
    assert int(aux.n_tokens) == N and aux.z_loss.item() == 0.0


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) agrees with eager
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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
    g = _gen(f"compile-{cid}")
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
    g = _gen("inductor")
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
        g = _gen(f"recompile-{T}")
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


def _spiky(dtype, N, V, spikes, g):
    """randn·3 rows with the given spike values put at random places; targets hit some spikes."""
    logits = torch.randn(N, V, generator=g, dtype=f64) * 3
    target = torch.randint(0, V, (N,), generator=g)
    for i, value in enumerate(spikes):
        row = i % N
        col = int(torch.randint(0, V, (1,), generator=g))
        logits[row, col] = value
        if i % 3 == 0:
            target[row] = col  # the spike is the target
    return logits.to(dtype), target


def _extreme_case(name, dtype):
    g = _gen(f"extreme-{name}")
    if name == "f32-spikes-1e4":
        return _spiky(dtype, 12, 33, [1e4, -1e4, 1e4, -1e4, 1e4, 1e4, -1e4, -1e4], g)
    if name == "f32-spike-3e38":
        logits, target = _spiky(dtype, 6, 17, [], g)
        logits[0, 4], target[0] = 3e38, 9  # loss ≈ 3e38: representable
        logits[1, 2], target[1] = 3e38, 2  # loss ≈ 0
        logits[2, 5], target[2] = -3e38, 1  # a huge negative off-target: no effect
        logits[3, 7], target[3] = 3e38, 7  # loss ≈ 0
        return logits, target
    if name == "f16-spikes-6e4":
        return _spiky(dtype, 12, 33, [6e4, -6e4, 6e4, -6e4, 65504.0, -65504.0, 6e4], g)
    if name == "bf16-spikes-1e30":
        return _spiky(dtype, 12, 33, [1e30, -1e30, 1e30, -1e30, 1e30, -1e30], g)
    if name.endswith("minus-1e30-rows"):
        noise = 3.0 if "uniform" in name else (1e23 if dtype == f32 else 3e28)
        logits = (-1e30 + torch.randn(6, 16, generator=g, dtype=f64) * noise).to(dtype)
        return logits, torch.randint(0, 16, (6,), generator=g)
    if name.endswith("confident"):
        logits = torch.randn(8, 40, generator=g, dtype=f64) * 3
        target = torch.randint(0, 40, (8,), generator=g)
        rows = torch.arange(8)
        logits[rows[:4], target[:4]] = 100.0  # sure and right: loss ≈ 0
        logits[rows[4:6], target[4:6]] = -100.0  # sure and wrong: loss ≈ 100
        return logits.to(dtype), target
    raise AssertionError(name)


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


def _error_or_inf(value, ref) -> float:
    try:
        return rel_error(value, ref)
    except AssertionError:  # PyTorch's NaN where the exact value is a number: infinitely wrong
        return math.inf


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize(
    "name, dtype, kw", EXTREMES, ids=[f"{n}-{'-'.join(sorted(k)) or 'plain'}" for n, _, k in EXTREMES]
)
def test_extremes(name, dtype, kw, reduction):
    logits, target = _extreme_case(name, dtype)
    kw = dict(kw, reduction=reduction)
    out_dtype = _output_dtype(dtype)
    upstream = torch.randint(1, 8, target.shape, generator=_gen(name)).to(f64) / 4 if reduction == "none" else None
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
        bound = 2 * _error_or_inf(theirs, exact) + SLACK[dt]
        assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"
    if name == "f32-uniform-minus-1e30-rows":  # every row is exactly -1e30: the loss is log V
        assert bool((logits == -1e30).all())
        torch.testing.assert_close(loss, torch.full_like(loss, math.log(16)), rtol=1e-6, atol=0)


def test_mean_of_huge_losses_is_finite_when_representable():
    """Two float32 tokens of loss 3e38: the sum (6e38) is not representable, the mean (1e38) is."""
    logits = torch.zeros(6, 5)
    target = torch.zeros(6, dtype=torch.long)
    logits[0, 1] = 3e38  # target 0 scores 3e38 below the best: loss 3e38
    logits[1, 0] = -3e38  # the target itself at -3e38: loss 3e38
    exact = R.cross_entropy(logits.double(), target)
    assert abs(exact.item() - 1e38) < 1e32 and exact.item() < torch.finfo(f32).max
    loss = crossent.cross_entropy(logits, target)
    assert torch.isfinite(loss), f"mean loss {loss.item()} where the exact value is {exact.item():.4e}"
    assert rel_error(loss, exact) <= SLACK[f32]


@pytest.mark.parametrize("dtype", [f32, bf16, f16])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_in_logits_propagate_as_in_pytorch(dtype, bad):
    g = _gen(f"nan-{dtype}-{bad}")
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


def test_nan_in_logits_gives_nan_loss_with_every_option():
    logits = torch.randn(4, 7)
    logits[1, 3] = math.nan
    target = torch.tensor([0, 1, 2, 3])
    kw = dict(weight=torch.rand(7) + 0.5, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, logit_scale=0.5)
    assert bool(torch.isnan(crossent.cross_entropy(logits, target, **kw)))
    per_token = crossent.cross_entropy(logits, target, reduction="none", **kw)
    assert bool(torch.isnan(per_token[1])) and torch.isfinite(per_token[[0, 2, 3]]).all()


# --------------------------------------------------------------------------------------------
# Out-of-range targets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, bad, position, value",
    [
        ((4,), {1: 7, 3: 9}, "(1,)", 7),
        ((4,), {2: -3}, "(2,)", -3),
        ((2, 3), {(0, 2): 5, (1, 0): 6}, "(0, 2)", 5),
    ],
)
def test_out_of_range_target_eager_cpu_raises_index_error(shape, bad, position, value):
    V = 5
    logits = torch.randn(*shape, V)
    target = torch.zeros(shape, dtype=torch.long)
    for where, v in bad.items():
        target[where] = v
    pattern = rf"target {value} at position {re.escape(position)}.*\[0, {V}\)"
    with pytest.raises(IndexError, match=pattern):
        crossent.cross_entropy(logits, target)
    with pytest.raises(IndexError, match=pattern):
        crossent.cross_entropy(logits.requires_grad_(), target, reduction="none", label_smoothing=0.1)


def test_ignore_index_outside_range_is_not_an_error():
    logits = torch.randn(3, 5)
    loss = crossent.cross_entropy(logits, torch.tensor([0, 17, 4]), ignore_index=17, reduction="none")
    assert loss[1].item() == 0.0


@pytest.mark.parametrize("bad_value", [7, -3])
def test_out_of_range_target_under_compile_gives_nan(fresh_dynamo, bad_value):
    V = 5
    g = _gen(f"oob-compile-{bad_value}")
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
# Module
# --------------------------------------------------------------------------------------------


def test_module_equals_functional_and_moves_its_weight():
    g = _gen("module")
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
