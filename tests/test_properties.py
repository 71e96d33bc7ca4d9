"""Property-based tests: hypothesis draws the inputs, the float64 oracle judges (DESIGN.md §6).

Every example draws a shape (N = 0 and V = 1 included), a dtype, a memory layout (strides), every
option, an ignore pattern (none, some, all; ``ignore_index`` a real class id or not), hard or soft
targets (soft rows that do not sum to 1 included), an upstream gradient and a chunk size (explicit,
or automatic from a memory budget down to 1 byte), then checks the loss, every gradient and
``LossAux`` against ``crossent.reference`` with the tolerance rule of ``tests/judge.py``.

Examples are tiny (a few dozen logits), so that 500 of them per property fit in a few seconds of
CI; the "ci" hypothesis profile of ``conftest.py`` makes them derandomised with ``deadline=None``.
The Triton backend runs under the interpreter (tests/conftest.py sets ``TRITON_INTERPRET``) with a
smaller budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import crossent
from crossent import reference as R
from helpers import cross_entropy as CE  # the helpers of the cross_entropy suite
from helpers import internals
from helpers import linear as LCE  # the helpers of the linear suite
from helpers.common import bf16, f16, f32, f64, output_dtype
from judge import assert_close_to_reference

#: examples per property in CI (the issue asks for at least 500 on the torch backend)
TORCH_EXAMPLES = 500
#: the Triton interpreter runs every kernel op as a NumPy call per program: a smaller budget
TRITON_EXAMPLES = 100

SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


class _Budget:
    """``crossent.set_memory_budget(nbytes)`` for the duration of a ``with`` block (None: untouched)."""

    def __init__(self, nbytes: int | None):
        self.nbytes, self.previous = nbytes, None

    def __enter__(self):
        if self.nbytes is not None:
            self.previous = crossent.set_memory_budget(self.nbytes)

    def __exit__(self, *exc):
        if self.nbytes is not None:
            crossent.set_memory_budget(self.previous)


# --------------------------------------------------------------------------------------------
# Strategies for the options shared by both losses
# --------------------------------------------------------------------------------------------

DTYPES = st.sampled_from([f32, bf16, f16, f64])
EPS = st.one_of(st.sampled_from([0.0, 0.0, 0.1, 1.0]), st.floats(0.0, 1.0))
Z_LOSS = st.sampled_from([0.0, 0.0, 1e-4, 1e-2, 0.3])
SOFTCAP = st.one_of(st.none(), st.none(), st.sampled_from([0.5, 5.0, 30.0]), st.floats(0.25, 50.0))
SCALE = st.one_of(
    st.sampled_from([1.0, 1.0, 0.125, -1.5, 3.0]),
    st.builds(lambda v, sign: sign * v, st.floats(0.05, 4.0), st.sampled_from([1.0, -1.0])),
)
REDUCTIONS = st.sampled_from(["mean", "sum", "none"])
IGNORE = st.sampled_from(["none", "some", "all"])
UPSTREAM = st.sampled_from(["unit", "random"])
#: memory budgets (bytes) for automatic chunks: None leaves the default (128 MiB)
BUDGETS = st.sampled_from([None, None, 1, 64, 4096])


@st.composite
def lead_shapes(draw, max_dims=3, max_tokens=24):
    """Leading dims: 0-dim (one token), (N,), (B, T) or (A, B, T); sizes 0..5, N = 0 included."""
    ndim = draw(st.integers(0, max_dims))
    dims = tuple(draw(st.integers(0, 5)) for _ in range(ndim))
    while math.prod(dims) > max_tokens:
        dims = tuple(max(1, d - 1) for d in dims)
    return dims


def _ignore_index(draw, V: int) -> int:
    """-100, a real class id, or an id past the vocabulary."""
    kind = draw(st.sampled_from(["default", "default", "class", "outside"]))
    if kind == "class":
        return draw(st.integers(0, V - 1))
    return -100 if kind == "default" else V + 3


def _hard_target(lead, V, ignore, ignore_index, g):
    target = torch.randint(0, V, lead, generator=g)
    n = math.prod(lead)
    if ignore == "all":
        target.fill_(ignore_index)
    elif ignore == "some" and n:
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        target.view(-1)[torch.randperm(n, generator=g)[:k]] = ignore_index
    return target


def _class_weight(kind, V, target, ignore_index, dtype, g):
    if kind is None:
        return None
    w = torch.rand(V, generator=g, dtype=f64) + 0.25
    if kind == "zero_kept":  # 0 on every kept target: the "mean" denominator is 0
        w[target[target != ignore_index].long()] = 0.0
    return w.to(dtype)


def _upstream(kind, shape, g) -> torch.Tensor:
    """Exactly representable in every dtype: 1, or multiples of 1/4 up to 7/4 (per token for "none")."""
    if kind == "unit":
        return torch.ones(shape, dtype=f64)
    return torch.randint(1, 8, shape, generator=g).to(f64) / 4


# --------------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CECase:
    lead: tuple
    V: int
    dtype: torch.dtype
    layout: str  # contig | slice | colmajor | transpose | unmergeable | expand
    reduction: str
    eps: float
    z_loss: float
    softcap: float | None
    scale: float
    target: str  # hard | soft | soft_unnormalised
    weight: str | None  # None | rand | zero_kept
    ignore: str  # none | some | all (hard targets)
    ignore_index: int
    upstream: str
    chunk: int | None
    budget: int | None
    inplace: bool
    aux: bool
    seed: int


def _layouts(lead) -> list[str]:
    out = ["contig", "slice", "colmajor"]
    if len(lead) >= 1:
        out.append("expand")
    if len(lead) >= 2:
        out += ["transpose", "unmergeable"]
    return out


@st.composite
def ce_cases(draw, dtypes=DTYPES, max_v=40):
    lead = draw(lead_shapes())
    V = draw(st.integers(1, max_v))
    target = draw(st.sampled_from(["hard", "hard", "soft", "soft_unnormalised"]))
    layout = draw(st.sampled_from(_layouts(lead)))
    inplace = draw(st.booleans()) and layout != "expand"  # expanded logits: see test_extremes
    chunk = draw(st.one_of(st.none(), st.integers(1, 30)))
    return CECase(
        lead=lead,
        V=V,
        dtype=draw(dtypes),
        layout=layout,
        reduction=draw(REDUCTIONS),
        eps=draw(EPS),
        z_loss=draw(Z_LOSS),
        softcap=draw(SOFTCAP),
        scale=draw(SCALE),
        target=target,
        weight=draw(st.sampled_from([None, None, "rand", "zero_kept"])),
        ignore=draw(IGNORE) if target == "hard" else "none",
        ignore_index=_ignore_index(draw, V),
        upstream=draw(UPSTREAM),
        chunk=chunk,
        budget=draw(BUDGETS) if chunk is None else None,
        inplace=inplace,
        aux=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


#: The spread (standard deviation) of the scores z = s·x in an example. Past about 4, float32 rows
#: get so confident that the loss, its gradient and the entropy are a few units in the last place
#: of 1: crossent's and PyTorch's errors are then single roundings, and which one is over twice the
#: other is a coin toss (measured: symmetric, ~1% of single-row examples at a spread of 6-12, none in
#: 4000 at 3). Such rows are tested in batches in test_extremes.py ("confident" cases).
SCORE_SPREAD = 3.0


def make_ce_logits(c: CECase, g: torch.Generator):
    """(base, view): ``view(base)`` is the (lead..., V) logits with the layout's strides."""
    lead, V = c.lead, c.V
    gen = f64 if c.dtype == f64 else f32
    spread = SCORE_SPREAD / max(1.0, abs(c.scale))  # of x, so that s·x spreads SCORE_SPREAD at most

    def rand(shape):
        return (torch.randn(shape, generator=g, dtype=gen) * spread).to(c.dtype)

    if c.layout == "contig":
        return rand(lead + (V,)), lambda t: t
    if c.layout == "slice":  # rows of a wider tensor: row stride > V
        return rand(lead + (V + 3,)), lambda t: t[..., 1 : V + 1]
    if c.layout == "colmajor":  # the class dim is not the innermost one
        return rand((V,) + lead), lambda t: t.movedim(0, -1)
    if c.layout == "transpose":
        return rand((lead[1], lead[0]) + lead[2:] + (V,)), lambda t: t.transpose(0, 1)
    if c.layout == "unmergeable":  # logits[:, :-1]: leading dims that no view can merge
        return rand((lead[0], lead[1] + 1) + lead[2:] + (V,)), lambda t: t[:, :-1]
    if c.layout == "expand":  # stride 0 along the first dim
        return rand((1,) + lead[1:] + (V,)), lambda t: t.expand(lead + (V,))
    raise AssertionError(c.layout)


def make_ce_target(c: CECase, g: torch.Generator):
    if c.target == "hard":
        return _hard_target(c.lead, c.V, c.ignore, c.ignore_index, g)
    if c.target == "soft":
        return torch.softmax(torch.randn(c.lead + (c.V,), generator=g, dtype=f64) * 2, -1).to(c.dtype)
    # non-negative rows that do not sum to 1 (some all zero): PyTorch's probability mode allows them
    p = torch.rand(c.lead + (c.V,), generator=g, dtype=f64) * 2
    p[torch.rand(c.lead, generator=g) < 0.2] = 0.0
    return p.to(c.dtype)


def ce_options(c: CECase) -> dict:
    kw = dict(reduction=c.reduction, label_smoothing=c.eps, z_loss=c.z_loss, softcap=c.softcap, logit_scale=c.scale)
    if c.target == "hard":
        kw["ignore_index"] = c.ignore_index
    return kw


def run_ce_case(c: CECase, impl: str = "torch") -> None:
    g = torch.Generator().manual_seed(c.seed)
    base, view = make_ce_logits(c, g)
    if impl == "triton":
        assume(known_triton_bug(c, base) is None)
    target = make_ce_target(c, g)
    soft = c.target != "hard"
    weight = _class_weight(c.weight, c.V, target if not soft else target.new_empty(0), c.ignore_index, c.dtype, g)
    kw = ce_options(c)
    out_dtype = output_dtype(c.dtype)

    leaf = base.clone().requires_grad_()
    x = view(leaf * 1 if c.inplace else leaf)  # in place: a non-leaf, as an LM head's output
    with _Budget(c.budget):
        out = crossent.cross_entropy(
            x,
            target,
            weight=weight,
            chunk_size=c.chunk,
            inplace_backward=c.inplace,
            return_aux=c.aux,
            impl=impl,
            **kw,
        )
        loss, aux = out if c.aux else (out, None)
        assert loss.dtype == out_dtype
        assert loss.shape == (c.lead if c.reduction == "none" else ())
        upstream = _upstream(c.upstream, loss.shape, g)
        loss.backward(upstream.to(loss.dtype))
    grad = leaf.grad
    assert grad.dtype == c.dtype and grad.shape == base.shape

    xr = base.to(f64, copy=True).requires_grad_()
    ref_out = R.cross_entropy(
        view(xr), target, weight=None if weight is None else weight.to(f64), return_aux=c.aux, **kw
    )
    ref_loss, ref_aux = ref_out if c.aux else (ref_out, None)
    ref_loss.backward(upstream)
    xb = base.clone().requires_grad_()
    base_loss, base_aux = CE.torch_at_dtype(view(xb), target, weight, **kw)
    base_loss.backward(upstream.to(base_loss.dtype))

    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close_to_reference("loss", loss, ref_loss, base_loss, c.dtype)
    assert_close_to_reference("grad", grad, xr.grad, xb.grad, c.dtype)
    if not soft:
        ignored = target == c.ignore_index
        if c.layout != "expand":  # an ignored token gets exactly 0 (expanded rows share storage)
            assert torch.count_nonzero(view(grad)[ignored]) == 0
        if c.reduction == "none":
            assert torch.count_nonzero(loss.detach()[ignored]) == 0
        if c.reduction == "mean" and _hard_denominator(target, weight, c) == 0.0:
            assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0, "a zero denominator gives exact zeros"
    if c.aux:
        CE.check_aux("aux", aux, ref_aux, base_aux, c.dtype, c.lead)


def _hard_denominator(target, weight, c: CECase) -> float:
    keep = target != c.ignore_index
    if weight is None:
        return float(keep.sum())
    return float(weight.to(f64)[target[keep]].sum())


_CE_DEFAULTS = dict(
    dtype=f32,
    layout="contig",
    reduction="mean",
    eps=0.0,
    z_loss=0.0,
    softcap=None,
    scale=1.0,
    target="hard",
    weight=None,
    ignore="none",
    ignore_index=-100,
    upstream="random",
    chunk=None,
    budget=None,
    inplace=False,
    aux=True,
    seed=0,
)


def known_bug(case) -> str | None:
    """Inputs of a crossent bug that a dedicated test in test_extremes.py keeps failing: the
    properties skip them so that they keep guarding everything else (remove once fixed)."""
    if case.V == 1 and case.z_loss != 0.0:
        return "V=1 with z-loss: the gradient cancels (test_extremes::test_v1_z_loss_gradient)"
    return None


def known_triton_bug(case: CECase, logits: torch.Tensor) -> str | None:
    """Like :func:`known_bug`, for the Triton kernels under the interpreter, from the logits."""
    if case.softcap is not None and logits.numel():
        if float((logits.float() * case.scale / case.softcap).abs().max()) > 2.0:
            return "interpreter tanh near saturation (test_extremes::test_saturated_softcap_gradient)"
    return None


def _ce(**kw) -> CECase:
    return CECase(**{**_CE_DEFAULTS, **kw})


@settings(max_examples=TORCH_EXAMPLES, **SETTINGS)
@given(ce_cases())
@example(_ce(lead=(0,), V=7, reduction="mean"))  # N = 0, each reduction
@example(_ce(lead=(2, 0), V=7, reduction="sum", target="soft", z_loss=1e-2))
@example(_ce(lead=(0, 3), V=5, reduction="none", eps=0.1, inplace=True))
@example(_ce(lead=(6,), V=1, reduction="mean", eps=0.3, softcap=2.0, scale=-1.5))  # V = 1
@example(_ce(lead=(5,), V=9, ignore="all", reduction="mean", weight="rand", dtype=bf16))  # all ignored
@example(_ce(lead=(5,), V=9, ignore="some", ignore_index=4, reduction="none", dtype=f16))  # a real class id
@example(_ce(lead=(3, 4), V=11, weight="zero_kept", eps=0.2, z_loss=1e-2, layout="unmergeable"))
@example(_ce(lead=(4,), V=6, target="soft_unnormalised", eps=0.1, weight="rand", reduction="sum"))
@example(_ce(lead=(3, 2), V=13, budget=1, layout="colmajor", softcap=5.0, inplace=True, dtype=bf16))
def test_cross_entropy_torch_matches_reference(case: CECase):
    assume(known_bug(case) is None)
    run_ce_case(case, impl="torch")


@st.composite
def triton_ce_cases(draw):
    """The same cases for the Triton kernels (16-bit and float32: float64 goes to PyTorch),
    with the kernels' vocabulary block and gradient mode drawn too."""
    case = draw(ce_cases(dtypes=st.sampled_from([f32, bf16, f16]), max_v=70))
    return case, draw(st.sampled_from([16, 32, 8192])), draw(st.sampled_from([None, True, False]))


@settings(max_examples=TRITON_EXAMPLES, **SETTINGS)
@given(triton_ce_cases())
@example((_ce(lead=(0,), V=7, reduction="mean"), 16, None))
@example((_ce(lead=(6,), V=1, reduction="none", eps=0.3, softcap=30.0), 16, True))
@example((_ce(lead=(2, 3), V=37, ignore="all", weight="rand", reduction="mean", dtype=bf16), 16, False))
@example((_ce(lead=(4,), V=40, target="soft_unnormalised", eps=0.1, weight="rand", inplace=True), 16, None))
@example((_ce(lead=(3, 4), V=33, weight="zero_kept", layout="unmergeable", z_loss=1e-2, dtype=f16), 32, True))
def test_cross_entropy_triton_interpreter_matches_reference(drawn):
    kernels = internals.triton_cross_entropy()
    case, block, grad_mode = drawn
    assume(known_bug(case) is None)
    saved = kernels.MAX_BLOCK_V, kernels.GRAD_IN_FORWARD
    kernels.MAX_BLOCK_V, kernels.GRAD_IN_FORWARD = block, grad_mode
    try:
        run_ce_case(case, impl="triton")
    finally:
        kernels.MAX_BLOCK_V, kernels.GRAD_IN_FORWARD = saved


# --------------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearCase:
    lead: tuple
    D: int
    V: int
    dtype: torch.dtype
    strided: bool  # non-contiguous hidden, weight and bias
    bias: bool
    class_weight: str | None
    reduction: str
    eps: float
    z_loss: float
    softcap: float | None
    scale: float
    ignore: str
    ignore_index: int
    shift: int
    schedule: str
    chunk: int | None
    budget: int | None
    grads: str  # which of hidden (h), weight (w), bias (b) require grad
    upstream: str
    aux: bool
    seed: int


@st.composite
def linear_cases(draw):
    lead = draw(lead_shapes())
    V = draw(st.integers(1, 40))
    # shift <= T here; shift > T (every position ignored) is an edge case of test_extremes
    shift = draw(st.integers(0, min(3, lead[-1]))) if lead else 0
    chunk = draw(st.one_of(st.none(), st.integers(1, 30)))
    bias = draw(st.booleans())
    grads = "".join(k for k in "hwb" if draw(st.booleans()) and (k != "b" or bias))
    return LinearCase(
        lead=lead,
        D=draw(st.integers(1, 9)),
        V=V,
        dtype=draw(DTYPES),
        strided=draw(st.booleans()),
        bias=bias,
        class_weight=draw(st.sampled_from([None, None, "rand", "zero_kept"])),
        reduction=draw(REDUCTIONS),
        eps=draw(EPS),
        z_loss=draw(Z_LOSS),
        softcap=draw(SOFTCAP),
        scale=draw(SCALE),
        ignore=draw(IGNORE),
        ignore_index=_ignore_index(draw, V),
        shift=shift,
        schedule=draw(st.sampled_from(["auto", "token", "vocab"])),
        chunk=chunk,
        budget=draw(BUDGETS) if chunk is None else None,
        grads=grads,
        upstream=draw(UPSTREAM),
        aux=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_linear_inputs(c: LinearCase, g: torch.Generator):
    lead, D, V = c.lead, c.D, c.V
    gen = f64 if c.dtype == f64 else f32

    def rand(shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=gen) * scale).to(c.dtype)

    w_scale = min(2.0, SCORE_SPREAD / abs(c.scale)) / math.sqrt(D)  # the scores spread SCORE_SPREAD at most
    if c.strided:
        hidden = rand(lead + (D + 2,))[..., 1 : D + 1]
        weight = rand((D, V), w_scale).T
        bias = rand((2 * V,), 0.5)[::2] if c.bias else None
    else:
        hidden, weight = rand(lead + (D,)), rand((V, D), w_scale)
        bias = rand((V,), 0.5) if c.bias else None
    target = _hard_target(lead, V, c.ignore, c.ignore_index, g)
    aligned = LCE.shift_by_hand(target, c.shift, c.ignore_index) if lead else target
    class_weight = _class_weight(c.class_weight, V, aligned, c.ignore_index, c.dtype, g)
    return hidden, weight, bias, target, class_weight


def run_linear_case(c: LinearCase) -> None:
    g = torch.Generator().manual_seed(c.seed)
    hidden, weight, bias, target, class_weight = make_linear_inputs(c, g)
    h = hidden.detach().requires_grad_("h" in c.grads)
    w = weight.detach().requires_grad_("w" in c.grads)
    b = bias.detach().requires_grad_("b" in c.grads) if bias is not None else None
    kw = dict(
        ignore_index=c.ignore_index,
        reduction=c.reduction,
        label_smoothing=c.eps,
        z_loss=c.z_loss,
        softcap=c.softcap,
        logit_scale=c.scale,
        shift=c.shift,
    )
    with _Budget(c.budget):
        out = crossent.linear_cross_entropy(
            h,
            w,
            target,
            bias=b,
            class_weight=class_weight,
            chunk_size=c.chunk,
            schedule=c.schedule,
            return_aux=c.aux,
            impl="torch",
            **kw,
        )
        loss, aux = out if c.aux else (out, None)
        assert loss.dtype == output_dtype(c.dtype)
        assert loss.shape == (c.lead if c.reduction == "none" else ())
        upstream = _upstream(c.upstream, loss.shape, g)
        assert loss.requires_grad == bool(c.grads)
        if c.grads:
            loss.backward(upstream.to(loss.dtype))
    mine = dict(h=h.grad, w=w.grad, b=b.grad if b is not None else None)

    ref_loss, ref_aux, ref = LCE.run_reference(
        hidden, weight, bias, target, class_weight, upstream, return_aux=c.aux, **kw
    )
    base_loss, base_aux, base = LCE.run_torch(hidden, weight, bias, target, class_weight, upstream, **kw)
    assert torch.isfinite(loss).all()
    assert_close_to_reference("loss", loss, ref_loss, base_loss, c.dtype)
    originals = dict(h=hidden, w=weight, b=bias)
    for key in "hwb":
        if key not in c.grads:
            assert mine[key] is None, f"grad of {key} was not requested but is set"
            continue
        grad = mine[key]
        assert grad is not None and grad.dtype == c.dtype and grad.shape == originals[key].shape
        assert torch.isfinite(grad).all()
        assert_close_to_reference(f"grad {key}", grad, ref[key], base[key], c.dtype)
    aligned = LCE.shift_by_hand(target, c.shift, c.ignore_index) if c.lead else target
    keep = aligned != c.ignore_index
    if "h" in c.grads:
        assert torch.count_nonzero(mine["h"][~keep]) == 0
    if c.reduction == "none":
        assert torch.count_nonzero(loss.detach()[~keep]) == 0
    if c.reduction == "mean" and LCE.mean_denominator(aligned, class_weight, c.ignore_index) == 0.0:
        assert loss.item() == 0.0
        for key in c.grads:
            assert torch.count_nonzero(mine[key]) == 0, f"zero denominator, nonzero grad {key}"
    if c.aux:
        LCE.check_aux("aux", aux, ref_aux, base_aux, c.dtype, keep, c.lead)


_LINEAR_DEFAULTS = dict(
    D=5,
    dtype=f32,
    strided=False,
    bias=True,
    class_weight=None,
    reduction="mean",
    eps=0.0,
    z_loss=0.0,
    softcap=None,
    scale=1.0,
    ignore="none",
    ignore_index=-100,
    shift=0,
    schedule="auto",
    chunk=None,
    budget=None,
    grads="hwb",
    upstream="random",
    aux=True,
    seed=0,
)


def _linear(**kw) -> LinearCase:
    return LinearCase(**{**_LINEAR_DEFAULTS, **kw})


@settings(max_examples=TORCH_EXAMPLES, **SETTINGS)
@given(linear_cases())
@example(_linear(lead=(0,), V=7, reduction="mean", schedule="token"))  # N = 0, each reduction
@example(_linear(lead=(2, 0), V=7, reduction="sum", schedule="vocab"))
@example(_linear(lead=(0, 3), V=7, reduction="none", shift=2))
@example(_linear(lead=(6,), V=1, eps=0.3, softcap=2.0, scale=-1.5))  # V = 1
@example(_linear(lead=(2, 3), V=9, ignore="all", class_weight="rand", schedule="vocab", dtype=bf16))
@example(_linear(lead=(2, 3), V=9, ignore="some", ignore_index=4, reduction="none", shift=1, dtype=f16))
@example(_linear(lead=(3, 4), V=11, class_weight="zero_kept", eps=0.2, z_loss=1e-2, schedule="token"))
@example(_linear(lead=(3, 2), V=13, budget=1, strided=True, softcap=5.0, dtype=bf16, schedule="vocab"))
@example(_linear(lead=(4, 3), V=13, budget=1, grads="w", dtype=bf16, schedule="auto"))
def test_linear_cross_entropy_torch_matches_reference(case: LinearCase):
    assume(known_bug(case) is None)
    run_linear_case(case)
