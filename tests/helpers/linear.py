"""Cases, inputs, the float64 oracle, the plain-PyTorch baseline and the runner of the
linear_cross_entropy suites.

A :class:`Case` describes one call (shapes, dtype, layout, options, which gradients are wanted);
:func:`make_inputs` draws its tensors from a seeded generator; :func:`run_reference` is the
float64 oracle ``crossent.reference.linear_cross_entropy`` and :func:`run_torch` the composed
PyTorch expression at the input dtype (``F.cross_entropy`` of ``hidden @ W.T + b``, scaled and
capped, plus the z-loss). :func:`run_case` runs one case on a backend and applies every check
with the tolerance rule of DESIGN.md §6 (tests/judge.py). Every expected value comes from the
oracle or from plain PyTorch, never from crossent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import crossent
from crossent import reference as R
from judge import assert_close_to_reference

from .common import f32, f64, gen, output_dtype


@dataclass(frozen=True)
class Case:
    """One linear_cross_entropy call: shapes, dtype, layout, options and wanted gradients."""

    id: str
    lead: tuple = (13,)  # (N,), (B, T) or (A, B, T)
    D: int = 13
    V: int = 301
    dtype: torch.dtype = f32
    reduction: str = "mean"
    bias: bool = False
    class_weight: str | None = None  # None | "rand" | "zero_kept" (0 on every kept target)
    eps: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    scale: float = 1.0
    ignore: float = 0.0  # fraction of tokens set to ignore_index
    ignore_index: int = -100
    shift: int = 0
    chunk: int | None = None
    schedule: str = "auto"
    grads: str = "hwb"  # which of hidden (h), weight (w), bias (b) require grad
    layout: str = "contig"  # contig | strided (non-contiguous hidden, weight and bias)
    aux: bool = False
    upstream: str = "random"  # "unit", or "random": per token for "none", a scalar != 1 otherwise


#: a (B, T) leading shape for the shift and strided cases
BT = (3, 5)
#: every option at once (``Case(..., **ALL)``)
ALL = dict(bias=True, class_weight="rand", eps=0.1, z_loss=1e-3, softcap=3.0, scale=0.75)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_inputs(case: Case, g: torch.Generator):
    """(hidden, weight, bias, target, class_weight), the floating ones at ``case.dtype``."""
    lead, D, V = case.lead, case.D, case.V
    draw_dtype = f64 if case.dtype == f64 else f32

    def rand(shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=draw_dtype) * scale).to(case.dtype)

    w_scale = 1.5 / math.sqrt(D)
    if case.layout == "strided":
        if len(lead) == 2:
            hidden = rand((lead[1], lead[0], D)).transpose(0, 1)
        else:
            hidden = rand(lead + (D + 3,))[..., 1 : D + 1]
        weight = rand((D, V), w_scale).T
        bias = rand((2 * V,), 0.5)[::2] if case.bias else None
        assert not hidden.is_contiguous() and not weight.is_contiguous()
    else:
        hidden, weight = rand(lead + (D,)), rand((V, D), w_scale)
        bias = rand((V,), 0.5) if case.bias else None
    target = torch.randint(0, V, lead, generator=g)
    n = math.prod(lead)
    drop = torch.randperm(n, generator=g)[: round(case.ignore * n)]
    target.view(-1)[drop] = case.ignore_index
    class_weight = None
    if case.class_weight is not None:
        w = torch.rand(V, generator=g, dtype=f64) + 0.5
        if case.class_weight == "zero_kept":
            w[target[target != case.ignore_index]] = 0.0
            assert bool((w > 0).any())
        class_weight = w.to(case.dtype)
    return hidden, weight, bias, target, class_weight


def make_upstream(case: Case, shape, g: torch.Generator) -> torch.Tensor:
    """The gradient fed to ``loss.backward``: exactly representable in every dtype (multiples of
    1/4 up to 7/4)."""
    if case.upstream == "unit":
        return torch.ones(shape, dtype=f64)
    if case.reduction == "none":
        return torch.randint(1, 8, shape, generator=g).to(f64) / 4
    return torch.tensor(0.75, dtype=f64)


def option_kwargs(case: Case) -> dict:
    """The keyword options of ``case`` shared by crossent, the oracle and plain PyTorch."""
    return dict(
        ignore_index=case.ignore_index,
        reduction=case.reduction,
        label_smoothing=case.eps,
        z_loss=case.z_loss,
        softcap=case.softcap,
        logit_scale=case.scale,
        shift=case.shift,
    )


def shift_by_hand(target: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """Position t gets target[..., t + shift]; the last ``shift`` positions are ignored."""
    if not shift:
        return target
    out = torch.full_like(target, ignore_index)
    T = target.shape[-1]
    if shift < T:
        out[..., : T - shift] = target[..., shift:]
    return out


def mean_denominator(aligned, class_weight, ignore_index) -> float:
    """The denominator of reduction="mean": the kept tokens, or the sum of their class weights."""
    keep = aligned != ignore_index
    if class_weight is None:
        return float(keep.sum())
    return float(class_weight.to(f64)[aligned[keep]].sum())


# --------------------------------------------------------------------------------------------
# The oracle and the plain-PyTorch baseline
# --------------------------------------------------------------------------------------------


def torch_at_dtype(
    hidden,
    weight,
    bias,
    target,
    class_weight=None,
    *,
    reduction,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    logit_scale=1.0,
    shift=0,
):
    """The composed expression in plain PyTorch at the inputs' dtype, with autograd:
    ``F.cross_entropy((hidden @ W.T + b) scaled and capped) + c·w_y·logsumexp²``.
    Returns (loss, dict of the LossAux quantities)."""
    lead = hidden.shape[:-1]
    aligned = shift_by_hand(target, shift, ignore_index)
    x = F.linear(hidden, weight, bias)
    V = x.shape[-1]
    z = x * logit_scale if logit_scale != 1.0 else x
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z2, t2 = z.reshape(-1, V), aligned.reshape(-1)
    ce = F.cross_entropy(
        z2, t2, weight=class_weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    keep = t2 != ignore_index
    y = torch.where(keep, t2, 0)
    w_y = torch.ones(y.shape, dtype=z2.dtype) if class_weight is None else class_weight[y]
    w_y = torch.where(keep, w_y, torch.zeros_like(w_y))
    denominator = w_y.sum()
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

    loss = reduce(ce + zl)
    with torch.no_grad():
        n_tokens = keep.sum()
        correct = ((z2.argmax(-1) == y) & keep).sum().to(z2.dtype)
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


def run_reference(hidden, weight, bias, target, class_weight, upstream, *, return_aux=False, **kw):
    """The float64 oracle: (loss, aux, {"h": grad, "w": grad, "b": grad})."""
    hr = hidden.detach().to(f64).requires_grad_()
    wr = weight.detach().to(f64).requires_grad_()
    br = bias.detach().to(f64).requires_grad_() if bias is not None else None
    cw = class_weight.to(f64) if class_weight is not None else None
    out = R.linear_cross_entropy(hr, wr, target, bias=br, class_weight=cw, return_aux=return_aux, **kw)
    loss, aux = out if return_aux else (out, None)
    if loss.requires_grad:
        loss.backward(upstream)
    grads = dict(h=hr.grad, w=wr.grad, b=br.grad if br is not None else None)
    return loss.detach(), aux, grads


def run_torch(hidden, weight, bias, target, class_weight, upstream, **kw):
    """Plain PyTorch at the input dtype: (loss, aux dict, grads)."""
    hb = hidden.detach().clone().requires_grad_()
    wb = weight.detach().clone().requires_grad_()
    bb = bias.detach().clone().requires_grad_() if bias is not None else None
    loss, aux = torch_at_dtype(hb, wb, bb, target, class_weight, **kw)
    loss.backward(upstream.to(loss.dtype))
    return loss.detach(), aux, dict(h=hb.grad, w=wb.grad, b=bb.grad if bb is not None else None)


def check_aux(case_id, aux, ref_aux, base_aux, dtype, keep, lead):
    """LossAux against the oracle's; lse and entropy compared where kept, and 0 elsewhere."""
    assert isinstance(aux, crossent.LossAux)
    out = output_dtype(dtype)
    for name in aux._fields:
        assert not getattr(aux, name).requires_grad, f"{case_id}: aux.{name} is not detached"
    assert aux.lse.shape == lead and aux.entropy.shape == lead
    assert aux.lse.dtype == out and aux.entropy.dtype == out
    assert aux.n_tokens.dtype == torch.int64 and aux.n_tokens.dim() == 0
    assert aux.weight_sum.dtype == f32 and aux.weight_sum.dim() == 0
    assert aux.accuracy.dtype == f32 and aux.accuracy.dim() == 0
    assert int(aux.n_tokens) == int(ref_aux.n_tokens) == int(keep.sum())
    for name in ("lse", "entropy"):  # crossent reports 0 at ignored positions
        value = getattr(aux, name)
        assert torch.count_nonzero(value[~keep]) == 0, f"{case_id}: aux.{name} is not 0 where ignored"
        if bool(keep.any()):
            assert_close_to_reference(
                f"{case_id} aux.{name}", value[keep], getattr(ref_aux, name)[keep], base_aux[name][keep], dtype
            )
    for name in ("ce", "z_loss", "weight_sum", "accuracy"):
        rule_dtype = f32 if name in ("weight_sum", "accuracy") and dtype == f64 else dtype
        assert_close_to_reference(
            f"{case_id} aux.{name}", getattr(aux, name), getattr(ref_aux, name), base_aux[name], rule_dtype
        )


# --------------------------------------------------------------------------------------------
# The runner: one case on one backend, every check
# --------------------------------------------------------------------------------------------


def case_generator(case: Case, impl: str) -> torch.Generator:
    """The generator of ``case``'s inputs on ``impl``: each backend's cases keep the seeds they
    have always had (the Triton ones prefixed), so their inputs do not change."""
    return gen(case.id if impl == "torch" else f"{impl}-{case.id}")


def _leaves(case: Case, hidden, weight, bias):
    """The inputs as leaves requiring grad as ``case.grads`` asks."""
    h = hidden.detach().requires_grad_("h" in case.grads)
    w = weight.detach().requires_grad_("w" in case.grads)
    b = bias.detach().requires_grad_("b" in case.grads) if bias is not None else None
    return h, w, b


def _check_grads(case: Case, mine: dict, originals: dict, ref: dict, base: dict) -> None:
    """Only the requested gradients are set, each of the input's dtype and shape, finite, and by
    the §6 rule."""
    for key in "hwb":
        if originals[key] is None or key not in case.grads:
            assert mine[key] is None, f"{case.id}: grad of {key} is set but was not requested"
            continue
        grad = mine[key]
        assert grad is not None, f"{case.id}: grad of {key} is missing"
        assert grad.dtype == case.dtype and grad.shape == originals[key].shape
        assert torch.isfinite(grad).all(), f"{case.id}: grad of {key} is not finite"
        assert_close_to_reference(f"{case.id} grad {key}", grad, ref[key], base[key], case.dtype)


def _check_ignored_and_zero_denominator(case: Case, loss, mine: dict, target, class_weight, keep) -> None:
    """Ignored positions get exactly 0; a zero denominator gives a loss and gradients of exactly 0."""
    if "h" in case.grads:  # an ignored position contributes nothing and gets exactly 0
        assert torch.count_nonzero(mine["h"][~keep]) == 0
    if case.reduction == "none":
        assert torch.count_nonzero(loss[~keep]) == 0
        if case.shift:
            assert torch.count_nonzero(loss[..., -case.shift :]) == 0
    aligned = shift_by_hand(target, case.shift, case.ignore_index)
    if not bool(keep.any()) or (
        case.reduction == "mean" and float(mean_denominator(aligned, class_weight, case.ignore_index)) == 0.0
    ):
        assert torch.count_nonzero(loss) == 0, f"{case.id}: a zero denominator must give a loss of exactly 0"
        for key in case.grads:
            if mine[key] is not None:
                assert torch.count_nonzero(mine[key]) == 0, f"{case.id}: zero denominator, nonzero grad {key}"


def run_case(case: Case, impl: str = "torch") -> None:
    """Run crossent (``impl=``), the oracle and plain PyTorch on one case and apply every check."""
    g = case_generator(case, impl)
    hidden, weight, bias, target, class_weight = make_inputs(case, g)
    h, w, b = _leaves(case, hidden, weight, bias)
    kw = option_kwargs(case)
    out = crossent.linear_cross_entropy(
        h,
        w,
        target,
        bias=b,
        class_weight=class_weight,
        chunk_size=case.chunk,
        schedule=case.schedule,
        return_aux=case.aux,
        impl=impl,
        **kw,
    )
    loss, aux = out if case.aux else (out, None)
    assert loss.dtype == output_dtype(case.dtype)
    assert loss.shape == (case.lead if case.reduction == "none" else ())
    upstream = make_upstream(case, loss.shape, g)
    wants_grad = any(t is not None and t.requires_grad for t in (h, w, b))
    assert loss.requires_grad == wants_grad
    if wants_grad:
        loss.backward(upstream.to(loss.dtype))
    mine = dict(h=h.grad, w=w.grad, b=b.grad if b is not None else None)

    ref_loss, ref_aux, ref = run_reference(
        hidden, weight, bias, target, class_weight, upstream, return_aux=case.aux, **kw
    )
    base_loss, base_aux, base = run_torch(hidden, weight, bias, target, class_weight, upstream, **kw)

    assert torch.isfinite(loss).all()
    assert_close_to_reference(f"{case.id} loss", loss, ref_loss, base_loss, case.dtype)
    _check_grads(case, mine, dict(h=hidden, w=weight, b=bias), ref, base)
    keep = shift_by_hand(target, case.shift, case.ignore_index) != case.ignore_index
    _check_ignored_and_zero_denominator(case, loss, mine, target, class_weight, keep)
    if case.aux:
        check_aux(case.id, aux, ref_aux, base_aux, case.dtype, keep, case.lead)


# --------------------------------------------------------------------------------------------
# torch.compile: inputs, and eager against compiled
# --------------------------------------------------------------------------------------------


def grads(*tensors):
    """The ``.grad`` of each tensor."""
    return [t.grad for t in tensors]


def compile_inputs(g, B, T, D=13, V=301, dtype=f32):
    """(hidden, weight, bias, target) of a (B, T) batch, one target ignored."""
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / math.sqrt(D)).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
    target = torch.randint(0, V, (B, T), generator=g)
    target[0, 1] = -100
    return hidden, weight, bias, target


def eager_and_compiled(fn, compiled, inputs, upstream):
    """[loss, grad h, grad w, grad b] of ``fn`` and of ``compiled`` on fresh leaves of ``inputs``."""
    out = []
    for f in (fn, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in inputs[:3]]
        loss = f(*leaves, inputs[3])
        loss.backward(upstream)
        out.append([loss.detach(), *grads(*leaves)])
    return out
