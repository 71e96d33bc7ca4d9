"""Cases, inputs, the float64 oracle's checks, the plain-PyTorch baseline and the runners of the
cross_entropy suites, for every backend.

A :class:`Case` describes one call (shape, dtype, layout, options, upstream gradient, and for the
Triton backend its kernels' vocabulary block and gradient mode); :func:`make_logits`,
:func:`make_target`, :func:`make_weight` and :func:`make_upstream` draw its tensors from a seeded
generator; :func:`torch_at_dtype` is the same formula in plain PyTorch at the input's dtype (the
baseline of the tolerance rule, DESIGN.md §6, tests/judge.py); :func:`run_case` runs one case on a
backend and applies every check. :data:`GRID` is the PyTorch backend's grid and
:data:`TRITON_GRID` the smaller one the Triton interpreter affords (:func:`cases_for`). Every
expected value comes from ``crossent.reference`` (float64) or from plain PyTorch, never from crossent.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import crossent
from crossent import reference as R
from judge import assert_close_to_reference, rel_error

from . import internals
from .common import bf16, f16, f32, f64, gen, output_dtype

DTYPES = (f16, bf16, f32, f64)


# --------------------------------------------------------------------------------------------
# Cases: the grid of DESIGN.md §6, explicit cases chosen for pairwise coverage
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One cross_entropy call: shape, layout, dtype, options, upstream, and Triton's kernel settings."""

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
    # the Triton kernels' MAX_BLOCK_V and GRAD_IN_FORWARD for this case (None: the module's own);
    # small blocks make the online merge over vocabulary blocks run at sizes the interpreter affords
    block: int | None = None
    grad_in_forward: bool | None = None


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

# The Triton interpreter runs every kernel op as a NumPy call per program, so its cost grows with
# rows × vocabulary blocks: small sizes, pairwise over dtypes, reductions and options; V below, at
# and above a block (odd and even); both gradient modes, alternately.
TRITON_GRID = [
    Case("t-f32-mean-V4100-b1024-ignore25", V=4100, lead=(16,), block=1024, grad_in_forward=True, ignore=0.25),
    Case(
        "t-bf16-sum-V4100-weight-eps-zloss-softcap",
        V=4100,
        lead=(16,),
        dtype=bf16,
        reduction="sum",
        weight="rand",
        eps=0.1,
        z_loss=1e-4,
        softcap=30.0,
        block=8192,
        grad_in_forward=False,
    ),
    Case(
        "t-f16-none-V1000-b256-eps-softcap-scale-ii7",
        V=1000,
        lead=(24,),
        dtype=f16,
        reduction="none",
        eps=0.2,
        softcap=5.0,
        scale=0.125,
        ignore=0.3,
        ignore_index=7,
        block=256,
        grad_in_forward=True,
    ),
    Case(
        "t-f32-mean-V33-b16-weight-zloss-negscale",
        V=33,
        lead=(48,),
        weight="rand",
        z_loss=1e-2,
        scale=-0.5,
        ignore=0.1,
        block=16,
        grad_in_forward=False,
    ),
    Case(
        "t-bf16-mean-V7-weight-all",
        V=7,
        lead=(48,),
        dtype=bf16,
        weight="rand",
        eps=0.3,
        z_loss=1e-3,
        softcap=2.0,
        scale=1.5,
        ignore=0.2,
        block=8192,
        grad_in_forward=True,
    ),
    Case(
        "t-f16-sum-V300-b64-zloss-ii0",
        V=300,
        lead=(17,),
        dtype=f16,
        reduction="sum",
        z_loss=1e-3,
        ignore=0.5,
        ignore_index=0,
        block=64,
        grad_in_forward=False,
    ),
    Case(
        "t-bf16-none-V257-b64-weight-eps-scale",
        V=257,
        lead=(40,),
        dtype=bf16,
        reduction="none",
        weight="rand",
        eps=0.05,
        scale=2.0,
        block=64,
        grad_in_forward=True,
    ),
    Case(
        "t-f32-mean-V1-eps-zloss", V=1, lead=(8,), eps=0.1, z_loss=1e-2, ignore=0.25, block=8192, grad_in_forward=False
    ),
    Case(
        "t-f32-sum-V256-eps1-softcap",
        V=256,
        lead=(64,),
        reduction="sum",
        eps=1.0,
        softcap=3.0,
        ignore=0.1,
        block=8192,
        grad_in_forward=True,
    ),
    Case(
        "t-soft-f32-mean-V129-b64-weight-eps-zloss",
        V=129,
        lead=(20,),
        soft=True,
        weight="rand",
        eps=0.1,
        z_loss=1e-3,
        block=64,
        grad_in_forward=False,
    ),
    Case(
        "t-soft-bf16-sum-V129-softcap-scale",
        V=129,
        lead=(20,),
        dtype=bf16,
        soft=True,
        reduction="sum",
        softcap=10.0,
        scale=0.5,
        block=8192,
        grad_in_forward=True,
    ),
    Case(
        "t-soft-f16-none-V2050-b1024-weight-eps-zloss",
        V=2050,
        lead=(12,),
        dtype=f16,
        soft=True,
        reduction="none",
        weight="rand",
        eps=0.2,
        z_loss=1e-4,
        block=1024,
        grad_in_forward=False,
    ),
    Case(
        "t-soft-f32-none-V64-b16-negscale",
        V=64,
        lead=(16,),
        soft=True,
        reduction="none",
        scale=-2.0,
        block=16,
        grad_in_forward=True,
    ),
]


def cases_for(impl: str) -> list[Case]:
    """The grid a backend runs: the full one on PyTorch, the interpreter-sized one on Triton."""
    return TRITON_GRID if impl == "triton" else GRID


@contextlib.contextmanager
def triton_settings(impl: str, *, block: int | None = None, grad_in_forward: bool | None = None):
    """The Triton kernels' vocabulary block (``MAX_BLOCK_V``) and gradient mode (``GRAD_IN_FORWARD``)
    inside a ``with`` block, restored after it; nothing changes for other backends or for None.
    Small blocks let the kernels' online merge over vocabulary blocks run at interpreter sizes."""
    if impl != "triton" or (block is None and grad_in_forward is None):
        yield
        return
    module = internals.triton_cross_entropy()
    saved = module.MAX_BLOCK_V, module.GRAD_IN_FORWARD
    try:
        if block is not None:
            module.MAX_BLOCK_V = block
        if grad_in_forward is not None:
            module.GRAD_IN_FORWARD = grad_in_forward
        yield
    finally:
        module.MAX_BLOCK_V, module.GRAD_IN_FORWARD = saved


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


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
    """Class ids with ``case.ignore`` of them set to ``ignore_index``, or soft target rows (case.dtype)."""
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
    """The class weights ``case.weight`` asks for (None, random, or 0 on every kept target)."""
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
    """The keyword arguments of ``case``'s options (``ignore_index`` for hard targets only)."""
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


def make_inputs(N, V, dtype, *, seed, soft=False, weighted=False, ignore_fraction=0.0, ignore_index=-100):
    """(logits, target, weight) of a small 2-D problem, for the tests that need no layout or case:
    logits randn·3 at ``dtype``, float32 soft targets and class weights (mixed with the logits' dtype)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
    if soft:
        target = torch.softmax(torch.randn(N, V, generator=g) * 2, -1)
    else:
        target = torch.randint(0, V, (N,), generator=g)
        target[torch.rand(N, generator=g) < ignore_fraction] = ignore_index
    weight = torch.rand(V, generator=g) + 0.5 if weighted else None
    return logits, target, weight


def upstream_for(loss, seed=1):
    """A non-unit upstream gradient of the loss's shape."""
    return torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=f64) + 0.5


def denominator(target, weight, ignore_index) -> float:
    """The "mean" denominator of hard targets: the summed weight of the kept tokens."""
    keep = target != ignore_index
    if weight is None:
        return float(keep.sum())
    return float(weight.to(f64)[target[keep]].sum())


# --------------------------------------------------------------------------------------------
# The baseline: the same formula in plain PyTorch at the input's dtype
# --------------------------------------------------------------------------------------------


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


def torch_baseline_with_aux(x, target, **options):
    """:func:`torch_at_dtype` called with crossent's keyword arguments (``weight`` among them,
    ``return_aux`` dropped); class weights and soft targets are cast to the logits' dtype, as
    F.cross_entropy wants a single dtype. Returns (loss, dict of the LossAux quantities)."""
    options = {k: v for k, v in options.items() if k != "return_aux"}
    options.setdefault("reduction", "mean")
    weight = options.pop("weight", None)
    if weight is not None:
        weight = weight.to(x.dtype)
    if target.is_floating_point():
        target = target.to(x.dtype)
    return torch_at_dtype(x, target, weight, **options)


def torch_baseline(x, target, **options):
    """The loss of :func:`torch_baseline_with_aux`: PyTorch's value at the input's dtype."""
    return torch_baseline_with_aux(x, target, **options)[0]


def error_or_inf(value, ref) -> float:
    """The relative error of ``value``, or inf where a NaN stands for a number (infinitely wrong)."""
    try:
        return rel_error(value, ref)
    except AssertionError:
        return math.inf


# --------------------------------------------------------------------------------------------
# Checks and runners: one case (or one set of tensors) on one backend
# --------------------------------------------------------------------------------------------


def loss_fn(impl: str):
    """crossent.cross_entropy on one backend."""
    return functools.partial(crossent.cross_entropy, impl=impl)


def loss_and_grad(fn, logits, target, upstream, dtype, **options):
    """(loss, gradient) of ``fn`` at the logits cast to ``dtype``, under the upstream gradient."""
    x = logits.detach().to(dtype).requires_grad_()
    loss = fn(x, target, **options)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad


def check_against_reference(impl, logits, target, dtype, **options):
    """The §6 rule for the loss and the gradient of ``impl``, under a non-unit upstream gradient."""
    ref_loss, _ = loss_and_grad(R.cross_entropy, logits, target, torch.ones(()), f64, **options)
    upstream = upstream_for(ref_loss)
    ref_loss, ref_grad = loss_and_grad(R.cross_entropy, logits, target, upstream, f64, **options)
    our_loss, our_grad = loss_and_grad(loss_fn(impl), logits, target, upstream, dtype, **options)
    pt_loss, pt_grad = loss_and_grad(torch_baseline, logits, target, upstream, dtype, **options)
    assert our_loss.dtype == output_dtype(dtype) and our_loss.shape == ref_loss.shape
    assert our_grad.dtype == dtype and our_grad.shape == logits.shape
    assert_close_to_reference("loss", our_loss, ref_loss, pt_loss, dtype)
    assert_close_to_reference("grad", our_grad, ref_grad, pt_grad, dtype)
    return our_loss, our_grad


def check_aux(case_id, aux, ref_aux, base_aux, dtype, lead):
    """LossAux: detached, dtypes and shapes of the contract, every field by the §6 rule."""
    assert isinstance(aux, crossent.LossAux)
    out = output_dtype(dtype)
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


def _case_inputs(case: Case, g: torch.Generator):
    """(base, view, target, weight) of ``case``; the view is non-contiguous for every other layout."""
    base, view = make_logits(case, g)
    target = make_target(case, g)
    weight = make_weight(case, target, g)
    return base, view, target, weight


def _run_crossent(case: Case, impl: str, base, view, target, weight, kw, g):
    """crossent on ``case``: (logits view, its values, loss, gradient w.r.t. the view, aux,
    upstream), checking dtypes and shapes, untouched columns and the in-place gradient on the way."""
    leaf = base.clone().requires_grad_()
    x = view(leaf * 1 if case.inplace else leaf)
    if case.layout != "contig":
        assert not x.is_contiguous()
    x_values = x.detach().clone()
    seen = []
    x.register_hook(seen.append)
    with triton_settings(impl, block=case.block, grad_in_forward=case.grad_in_forward):
        out = crossent.cross_entropy(
            x,
            target,
            weight=weight,
            chunk_size=case.chunk,
            inplace_backward=case.inplace,
            return_aux=case.aux,
            impl=impl,
            **kw,
        )
        loss, aux = out if case.aux else (out, None)
        assert loss.dtype == output_dtype(case.dtype)
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
    return x_values, loss, grad, aux, upstream


def _check_ignored_and_zero_denominator(case: Case, loss, grad, target, weight) -> None:
    """Ignored tokens contribute and get exactly 0; a zero "mean" denominator gives exact zeros."""
    if not case.soft:  # an ignored token contributes exactly 0 and gets exactly 0
        ignored = target == case.ignore_index
        assert torch.count_nonzero(grad[ignored]) == 0
        if case.reduction == "none":
            assert torch.count_nonzero(loss[ignored]) == 0
    if case.reduction == "mean" and not case.soft and denominator(target, weight, case.ignore_index) == 0.0:
        assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0, "zero denominator must give exact zeros"
    if case.ignore == 1.0:
        assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0


def run_case(case: Case, impl: str = "torch") -> None:
    """Run crossent (``impl=``), the float64 oracle and plain PyTorch on one case; apply every check."""
    g = gen(case.id)
    base, view, target, weight = _case_inputs(case, g)
    kw = option_kwargs(case)
    x_values, loss, grad, aux, upstream = _run_crossent(case, impl, base, view, target, weight, kw, g)

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
    _check_ignored_and_zero_denominator(case, loss, grad, target, weight)
    if case.aux:
        check_aux(case.id, aux, ref_aux, base_aux, case.dtype, case.lead)


# --------------------------------------------------------------------------------------------
# Extreme inputs
# --------------------------------------------------------------------------------------------


def spiky(dtype, N, V, spikes, g):
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


def extreme_case(name, dtype):
    """(logits, target) of one named extreme case: spikes, -1e30 rows, confident rows."""
    g = gen(f"extreme-{name}")
    if name == "f32-spikes-1e4":
        return spiky(dtype, 12, 33, [1e4, -1e4, 1e4, -1e4, 1e4, 1e4, -1e4, -1e4], g)
    if name == "f32-spike-3e38":
        logits, target = spiky(dtype, 6, 17, [], g)
        logits[0, 4], target[0] = 3e38, 9  # loss ≈ 3e38: representable
        logits[1, 2], target[1] = 3e38, 2  # loss ≈ 0
        logits[2, 5], target[2] = -3e38, 1  # a huge negative off-target: no effect
        logits[3, 7], target[3] = 3e38, 7  # loss ≈ 0
        return logits, target
    if name == "f16-spikes-6e4":
        return spiky(dtype, 12, 33, [6e4, -6e4, 6e4, -6e4, 65504.0, -65504.0, 6e4], g)
    if name == "bf16-spikes-1e30":
        return spiky(dtype, 12, 33, [1e30, -1e30, 1e30, -1e30, 1e30, -1e30], g)
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
