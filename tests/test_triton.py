"""The Triton backend of cross_entropy on CPU tensors, under the Triton interpreter.

The interpreter reads ``TRITON_INTERPRET`` when kernels are defined, so it is set here, before
anything imports ``crossent.triton_impl`` (which is imported only when first used). Checks that
need it off run in a subprocess. Sizes are small and the option grid pairwise (DESIGN.md §6): the
interpreter runs every Triton op as a NumPy call per program, so the cost grows with rows × blocks.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo.testing  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import crossent  # noqa: E402
from crossent import reference as R  # noqa: E402
from crossent.functional import interpreter_on, triton_available  # noqa: E402
from crossent.options import LossOptions  # noqa: E402
from judge import assert_close_to_reference  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="needs the triton package"),
    pytest.mark.skipif(not interpreter_on(), reason="TRITON_INTERPRET is set off in the environment"),
]

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


@pytest.fixture
def kernels(monkeypatch):
    """The kernel module, with its block size and gradient mode restored after each test."""
    from crossent.triton_impl import cross_entropy as module

    monkeypatch.setattr(module, "MAX_BLOCK_V", module.MAX_BLOCK_V)
    monkeypatch.setattr(module, "GRAD_IN_FORWARD", module.GRAD_IN_FORWARD)
    return module


def make_inputs(N, V, dtype, *, seed, soft=False, weighted=False, ignore_fraction=0.0, ignore_index=-100):
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


def torch_formula(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None, logit_scale=1.0):  # fmt: skip
    """DESIGN.md §1 composed from plain PyTorch ops at the logits' dtype (the §6 baseline)."""
    V = logits.shape[-1]
    z = logits * logit_scale if logit_scale != 1.0 else logits
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z.reshape(-1, V)
    w = weight.to(logits.dtype) if weight is not None else None
    lse = torch.logsumexp(z, -1)
    if target.is_floating_point():
        p = target.reshape(-1, V).to(logits.dtype)
        ce = F.cross_entropy(z, p, weight=w, reduction="none", label_smoothing=label_smoothing)
        zl = z_loss * lse * lse
        denominator = torch.tensor(float(z.shape[0]), dtype=logits.dtype)
    else:
        t = target.reshape(-1)
        ce = F.cross_entropy(
            z, t, weight=w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
        )
        keep = t != ignore_index
        w_y = torch.ones_like(lse) if w is None else w[torch.where(keep, t, 0)]
        w_y = torch.where(keep, w_y, torch.zeros_like(w_y))
        zl = z_loss * w_y * lse * lse
        denominator = w_y.sum()
    loss = ce + zl
    if reduction == "none":
        return loss.reshape(logits.shape[:-1])
    total = loss.sum()
    if reduction == "sum":
        return total
    return torch.where(denominator != 0, total / torch.where(denominator != 0, denominator, 1), 0 * total)


def loss_and_grad(fn, logits, target, upstream, dtype, **options):
    x = logits.detach().to(dtype).requires_grad_()
    loss = fn(x, target, **options)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad


def ours(x, target, **options):
    return crossent.cross_entropy(x, target, impl="triton", **options)


def check_against_reference(logits, target, dtype, **options):
    """The §6 rule for the loss and the gradient, under a non-unit upstream gradient."""
    ref_loss, _ = loss_and_grad(R.cross_entropy, logits, target, torch.ones(()), f64, **options)
    upstream = upstream_for(ref_loss)
    ref_loss, ref_grad = loss_and_grad(R.cross_entropy, logits, target, upstream, f64, **options)
    our_loss, our_grad = loss_and_grad(ours, logits, target, upstream, dtype, **options)
    pt_loss, pt_grad = loss_and_grad(torch_formula, logits, target, upstream, dtype, **options)
    assert our_loss.dtype == f32 and our_loss.shape == ref_loss.shape
    assert our_grad.dtype == dtype and our_grad.shape == logits.shape
    assert_close_to_reference("loss", our_loss, ref_loss, pt_loss, dtype)
    assert_close_to_reference("grad", our_grad, ref_grad, pt_grad, dtype)
    return our_loss, our_grad


# (N, V, dtype, block, reduction, weighted, ε, c, softcap, scale, soft, ignore_fraction, ignore_index):
# pairwise over dtypes, reductions and options; V below, at and above a block, odd and even.
GRID = [
    (16, 4100, f32, 1024, "mean", False, 0.0, 0.0, None, 1.0, False, 0.25, -100),
    (16, 4100, bf16, 8192, "sum", True, 0.1, 1e-4, 30.0, 1.0, False, 0.0, -100),
    (24, 1000, f16, 256, "none", False, 0.2, 0.0, 5.0, 0.125, False, 0.3, 7),
    (48, 33, f32, 16, "mean", True, 0.0, 1e-2, None, -0.5, False, 0.1, -100),
    (48, 7, bf16, 8192, "mean", True, 0.3, 1e-3, 2.0, 1.5, False, 0.2, -100),
    (17, 300, f16, 64, "sum", False, 0.0, 1e-3, None, 1.0, False, 0.5, 0),
    (40, 257, bf16, 64, "none", True, 0.05, 0.0, None, 2.0, False, 0.0, -100),
    (8, 1, f32, 8192, "mean", False, 0.1, 1e-2, None, 1.0, False, 0.25, -100),
    (64, 256, f32, 8192, "sum", False, 1.0, 0.0, 3.0, 1.0, False, 0.1, -100),
    (20, 129, f32, 64, "mean", True, 0.1, 1e-3, None, 1.0, True, 0.0, -100),
    (20, 129, bf16, 8192, "sum", False, 0.0, 0.0, 10.0, 0.5, True, 0.0, -100),
    (12, 2050, f16, 1024, "none", True, 0.2, 1e-4, None, 1.0, True, 0.0, -100),
    (16, 64, f32, 16, "none", False, 0.0, 0.0, None, -2.0, True, 0.0, -100),
]


@pytest.mark.parametrize("case", range(len(GRID)))
def test_matches_reference(kernels, case):
    N, V, dtype, block, reduction, weighted, eps, c, k, s, soft, ignore_fraction, ignore_index = GRID[case]
    kernels.MAX_BLOCK_V = block
    kernels.GRAD_IN_FORWARD = case % 2 == 0  # both gradient modes, alternately
    logits, target, weight = make_inputs(
        N, V, dtype, seed=case, soft=soft, weighted=weighted, ignore_fraction=ignore_fraction, ignore_index=ignore_index
    )
    options = dict(weight=weight, reduction=reduction, label_smoothing=eps, z_loss=c, softcap=k, logit_scale=s)
    if not soft:
        options["ignore_index"] = ignore_index
    check_against_reference(logits, target, dtype, **options)


def test_gradient_modes_agree_bit_for_bit(kernels):
    """In forward (then scaled in backward) or recomputed in backward: the same kernel code."""
    kernels.MAX_BLOCK_V = 64
    logits, target, weight = make_inputs(12, 150, bf16, seed=3, weighted=True, ignore_fraction=0.3)
    options = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, logit_scale=0.7)
    results = []
    for mode in (True, False):
        kernels.GRAD_IN_FORWARD = mode
        results.append(loss_and_grad(ours, logits, target, torch.ones(()), bf16, **options))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_identical_calls_give_identical_bits(kernels):
    kernels.MAX_BLOCK_V = 128
    logits, target, _ = make_inputs(16, 500, f16, seed=4, ignore_fraction=0.2)
    upstream = torch.tensor(1.7)
    first = loss_and_grad(ours, logits, target, upstream, f16, label_smoothing=0.1, z_loss=1e-4)
    second = loss_and_grad(ours, logits, target, upstream, f16, label_smoothing=0.1, z_loss=1e-4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# --------------------------------------------------------------------------------------------
# return_aux
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, soft, options",
    [
        (f32, False, dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=5)),
        (bf16, False, dict(reduction="none", z_loss=1e-2, weight="random")),
        (f16, True, dict(reduction="sum", label_smoothing=0.2, z_loss=1e-3)),
    ],
)
def test_aux_fields(kernels, dtype, soft, options):
    kernels.MAX_BLOCK_V = 64
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
    loss, aux = crossent.cross_entropy(logits, target, impl="triton", return_aux=True, **options)
    ref_loss, ref = R.cross_entropy(logits, target, return_aux=True, **options)
    pt = torch_formula(logits, target, **options)
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


def _same_as_contiguous(x, target, **options):
    ours_nc = loss_and_grad(ours, x, target, torch.tensor(1.3), x.dtype, **options)
    ours_c = loss_and_grad(ours, x.contiguous(), target.contiguous(), torch.tensor(1.3), x.dtype, **options)
    assert torch.equal(ours_nc[0], ours_c[0])
    assert torch.equal(ours_nc[1], ours_c[1])


def test_rows_that_cannot_be_merged(kernels):
    """logits[:, :-1] of a (B, T, V) tensor: the leading dims are iterated as 2-D blocks."""
    kernels.MAX_BLOCK_V = 64
    full = (torch.randn(3, 9, 100) * 2).to(bf16)
    target = torch.randint(0, 100, (3, 9))
    target[1, 2] = -100
    x = full[:, :-1]
    _same_as_contiguous(x, target[:, 1:], z_loss=1e-3)
    check_against_reference(x, target[:, 1:], bf16, reduction="none")


def test_columns_strided_and_rows_padded(kernels):
    kernels.MAX_BLOCK_V = 64
    target = torch.randint(0, 90, (10,))
    transposed = torch.randn(90, 10).t()  # column stride 10: int64 column offsets
    _same_as_contiguous(transposed, target, label_smoothing=0.1, softcap=3.0)
    padded = torch.randn(10, 128)[:, :90]  # row stride 128 > V
    _same_as_contiguous(padded, target, weight=torch.rand(90) + 0.5, label_smoothing=0.2)


def test_soft_targets_strided(kernels):
    kernels.MAX_BLOCK_V = 32
    x = torch.randn(70, 12).t().to(f16)
    p = torch.softmax(torch.randn(70, 12), 0).t()  # (12, 70), column stride 12
    _same_as_contiguous(x, p, label_smoothing=0.1, z_loss=1e-3)


# --------------------------------------------------------------------------------------------
# Gradient plumbing: in place, compile, retained graphs
# --------------------------------------------------------------------------------------------


def test_inplace_backward_overwrites_the_logits(kernels):
    kernels.MAX_BLOCK_V = 64
    base, target, weight = make_inputs(16, 130, bf16, seed=6, weighted=True, ignore_fraction=0.2)
    options = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    expected = loss_and_grad(ours, base, target, torch.ones(()), bf16, **options)

    leaf = base.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as an LM head's output
    storage = logits.data_ptr()
    loss = crossent.cross_entropy(logits, target, impl="triton", inplace_backward=True, **options)
    loss.backward()
    assert torch.equal(loss.detach(), expected[0])
    assert torch.equal(leaf.grad, expected[1])
    assert logits.data_ptr() == storage and torch.equal(logits.detach(), expected[1])  # consumed

    leaf = base.clone().requires_grad_()
    loss = crossent.cross_entropy(leaf * 1.0, target, impl="triton", inplace_backward=True, **options)
    (loss * 2.5).backward()
    torch.testing.assert_close(leaf.grad.float(), (expected[1].float() * 2.5).to(bf16).float(), rtol=1e-2, atol=0)


def test_second_backward_through_a_retained_graph(kernels):
    kernels.MAX_BLOCK_V = 64
    kernels.GRAD_IN_FORWARD = True
    logits, target, _ = make_inputs(10, 100, f32, seed=7, ignore_fraction=0.2)
    x = logits.clone().requires_grad_()
    loss = crossent.cross_entropy(x, target, impl="triton", z_loss=1e-3)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    (loss * 3.0).backward()  # the in-forward gradient was consumed: this one is recomputed
    torch.testing.assert_close(x.grad, 4.0 * once, rtol=1e-6, atol=1e-9)


def test_compile_fullgraph_agrees_with_eager(kernels):
    kernels.MAX_BLOCK_V = 64
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def loss_fn(x, target, weight):
        return crossent.cross_entropy(x, target, weight=weight, impl="triton", label_smoothing=0.1, z_loss=1e-3)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    for T in (8, 12, 16):  # new sequence lengths: at most one recompile (to a dynamic shape)
        logits, target, weight = make_inputs(T, 150, bf16, seed=T, weighted=True, ignore_fraction=0.2)
        # upstream 1: eager's in-forward gradient is not rescaled, so both round once, alike
        eager = loss_and_grad(loss_fn, logits, target, torch.ones(()), bf16, weight=weight)
        comp = loss_and_grad(compiled, logits, target, torch.ones(()), bf16, weight=weight)
        assert torch.equal(comp[0], eager[0])
        assert torch.equal(comp[1], eager[1])
    assert counter.frame_count <= 2


def test_compile_inplace_and_aux(kernels):
    kernels.MAX_BLOCK_V = 8192
    logits, target, _ = make_inputs(8, 40, f32, seed=8, ignore_fraction=0.2)

    def fn(x):
        loss, aux = crossent.cross_entropy(x * 1.0, target, impl="triton", inplace_backward=True, return_aux=True)
        return loss, aux.lse, aux.entropy, aux.accuracy

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        x = logits.clone().requires_grad_()
        loss, *stats = f(x)
        (loss * 1.5).backward()
        results.append((loss.detach(), *stats, x.grad))
    for eager, compiled in zip(*results, strict=True):
        assert torch.equal(compiled, eager)


# --------------------------------------------------------------------------------------------
# Edge cases and invariants
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nothing_left_gives_exact_zeros(kernels, reduction):
    kernels.MAX_BLOCK_V = 32
    logits, target, _ = make_inputs(6, 50, f16, seed=9)
    for t, weight, kept in ((torch.full_like(target, -100), None, 0), (target, torch.zeros(50), 6)):
        x = logits.clone().requires_grad_()
        loss, aux = crossent.cross_entropy(x, t, weight=weight, reduction=reduction, impl="triton", return_aux=True)
        loss.backward()
        assert float(loss.detach()) == 0.0 and not bool(x.grad.any())
        assert int(aux.n_tokens) == kept and float(aux.weight_sum) == 0.0
        if kept == 0:
            assert float(aux.accuracy) == 0.0


def test_out_of_range_targets_give_nan_without_reading_them(kernels):
    """Through the backend directly (the public function raises IndexError on CPU in eager)."""
    from crossent.triton_impl import cross_entropy_op

    kernels.MAX_BLOCK_V = 32
    logits, target, _ = make_inputs(6, 40, f32, seed=10)
    target[1], target[4] = 40, -7
    target[2] = -100
    for mode in (True, False):
        kernels.GRAD_IN_FORWARD = mode
        x = logits.clone().requires_grad_()
        loss = cross_entropy_op(x, target, None, LossOptions(reduction="none", impl="triton"))[0]
        loss.sum().backward()
        bad = torch.tensor([False, True, False, False, True, False])
        assert bool(loss[bad].isnan().all()) and bool(loss[~bad].isfinite().all())
        assert float(loss.detach()[2]) == 0.0
        assert bool(x.grad[bad].isnan().all()) and bool(x.grad[~bad].isfinite().all())
        mean = cross_entropy_op(logits, target, None, LossOptions(impl="triton"))[0]
        assert bool(mean.isnan())


def test_invariants(kernels):
    kernels.MAX_BLOCK_V = 64
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


def test_huge_offsets_keep_log_probabilities_exact(kernels):
    """A row of -1e30 + noise (float32): (z_y - m) - log S keeps every digit; lse - z_y keeps none."""
    kernels.MAX_BLOCK_V = 16
    noise = torch.randn(4, 40, dtype=f64) * 1e23
    logits = (-1e30 + noise).to(f32)
    target = torch.randint(0, 40, (4,))
    our_loss, our_grad = check_against_reference(logits, target, f32, reduction="none")
    assert bool((our_loss > 0).all())


def test_float64_is_served_exactly(kernels):
    """float64 inputs run on the PyTorch backend (float32 kernel arguments would round ε, s, k)."""
    logits, target, weight = make_inputs(6, 30, f64, seed=12, weighted=True)
    options = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, logit_scale=0.3)
    ours_loss, ours_grad = loss_and_grad(ours, logits, target, torch.ones(()), f64, **options)
    ref_loss, ref_grad = loss_and_grad(R.cross_entropy, logits, target, torch.ones(()), f64, **options)
    assert ours_loss.dtype == f64
    torch.testing.assert_close(ours_loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_empty_batch(kernels):
    x = torch.randn(0, 10, requires_grad=True)
    loss = ours(x, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and x.grad.shape == (0, 10)


# --------------------------------------------------------------------------------------------
# Dispatch, with the interpreter off (a subprocess: the setting is read when kernels are defined)
# --------------------------------------------------------------------------------------------


def test_dispatch_without_the_interpreter():
    script = textwrap.dedent(
        """
        import sys
        import torch
        import crossent
        assert "triton" not in sys.modules, "import crossent imported triton"
        x, t = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
        auto = crossent.cross_entropy(x, t)  # impl="auto" on CPU tensors: the PyTorch backend
        assert torch.equal(auto, crossent.cross_entropy(x, t, impl="torch"))
        assert "crossent.triton_impl" not in sys.modules
        try:
            crossent.cross_entropy(x, t, impl="triton")
        except ValueError as error:
            message = str(error)
        else:
            raise AssertionError("impl='triton' on CPU tensors did not raise")
        assert "impl" in message and "CUDA" in message and "TRITON_INTERPRET" in message and "cpu" in message
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


COMPILE_FOR_GPU = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from crossent.triton_impl import cross_entropy as C

FLOATS = ("one_minus_eps", "eps_over_v", "c", "k", "s")
ROW_STRIDES = ("x_rs", "t_rs", "gx_rs")


def compile_one(kernel, *, soft, options, extra, unit, specialize=()):
    names = kernel.arg_names
    flags = dict(BLOCK_V=8192, SOFT=soft, X_UNIT=unit, T_UNIT=unit, G_UNIT=unit, LIBDEVICE=True, **extra)
    flags.update({n: options for n in names if n.startswith("HAS_")})
    flags.update({n: 1 for n in specialize})  # Triton specializes int arguments equal to 1
    flags = {k: v for k, v in flags.items() if k in names}
    signature = {}
    for n in names:
        if n in flags:
            signature[n] = "constexpr"
        elif n == "t_ptr":
            signature[n] = "*fp16" if soft else "*i64"
        elif n in ("x_ptr", "gx_ptr"):
            signature[n] = "*bf16"
        elif n.endswith("_ptr"):
            signature[n] = "*fp32"
        else:
            signature[n] = "fp32" if n in FLOATS else "i64" if n in ROW_STRIDES else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=flags)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
    assert compiled.asm["cubin"], "no cubin"


try:
    for soft in (False, True):
        for options, unit in ((False, True), (True, False)):
            compile_one(C._forward_kernel, soft=soft, options=options, unit=unit,
                        extra=dict(WANT_AUX=options, COMPUTE_GRAD=options))
            compile_one(C._backward_kernel, soft=soft, options=options, unit=unit, extra={})
    compile_one(C._forward_kernel, soft=False, options=True, unit=True, extra=dict(WANT_AUX=True, COMPUTE_GRAD=True),
                specialize=("V", "ignore_index", "x_rs", "x_cs", "t_cs", "gx_rs", "gx_cs"))
except Exception as error:
    if "ptxas" in str(error).lower() and "not found" in str(error).lower():
        print("no ptxas")
        sys.exit(3)
    raise
print("ok")
"""


def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter runs Python, not the compiler: build the kernels for sm_90 (ptxas, no GPU
    needed) so that type errors of the compiled path show here too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode == 3:
        pytest.skip("Triton's ptxas is not available on this machine")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
