"""Robustness in use: torch.compile over models, autocast, activation checkpointing, determinism,
threads, and memory under pressure (DESIGN.md §4: the memory budget).

Memory is measured with ``torch.profiler`` (``profile_memory=True``): the running sum of the CPU
allocator's allocation and free events during a call gives the most the call held at once beyond
what existed before it — every tensor, to the byte, and nothing outside PyTorch's allocator.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

import crossent
from crossent import reference as R
from helpers import cross_entropy as CE  # the helpers of the cross_entropy suite
from helpers import internals
from helpers import linear as LCE  # the helpers of the linear suite
from helpers.common import bf16, f16, f32, f64, gen
from judge import assert_close_to_reference


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def budget():
    """``set(nbytes)`` changes the memory budget for the test; the previous one is restored after."""
    previous = crossent.get_memory_budget()
    yield lambda nbytes: crossent.set_memory_budget(nbytes)
    crossent.set_memory_budget(previous)


# --------------------------------------------------------------------------------------------
# A tiny language model using each loss
# --------------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """Embedding → tanh(Linear) → classifier; the loss is crossent's, on the shifted labels.

    ``loss="ce"``: the logits (B, T, V), sliced ``[:, :-1]`` (leading dims no view can merge), go
    to ``cross_entropy``; ``loss="linear"``: the hidden states and the classifier weight go to
    ``linear_cross_entropy(shift=1)``; ``loss="torch"``: the same model with F.cross_entropy.
    """

    def __init__(self, loss: str, V: int = 37, D: int = 16, *, inplace: bool = False, ckpt: bool = False):
        super().__init__()
        self.loss, self.inplace, self.ckpt = loss, inplace, ckpt
        self.embed = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.options = dict(z_loss=1e-3, label_smoothing=0.1)

    def hidden(self, tokens):
        return torch.tanh(self.mix(self.embed(tokens)))

    def tail(self, h, labels):
        if self.loss == "linear":
            return crossent.linear_cross_entropy(h, self.head.weight, labels, shift=1, **self.options)
        logits = self.head(h)[:, :-1]
        if self.loss == "torch":
            return F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], label_smoothing=0.1)
        return crossent.cross_entropy(logits, labels[:, 1:], inplace_backward=self.inplace, **self.options)

    def forward(self, tokens, labels):
        h = self.hidden(tokens)
        if self.ckpt:
            return checkpoint(self.tail, h, labels, use_reentrant=False)
        return self.tail(h, labels)


def _batch(T: int, V: int = 37, B: int = 2, key: str = "batch"):
    g = gen(f"{key}-{T}")
    tokens = torch.randint(0, V, (B, T), generator=g)
    labels = tokens.clone()
    labels[0, T // 2] = -100
    return tokens, labels


def _loss_and_grads(model, tokens, labels, call=None):
    """Loss and parameter gradients of ``(call or model)(tokens, labels)``."""
    model.zero_grad(set_to_none=True)
    loss = (model if call is None else call)(tokens, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) over a model: no graph break, no recompile, same values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "linear"])
def test_compile_model_fullgraph_no_recompile_same_values(fresh_dynamo, loss):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = TinyLM(loss)
    tokens, labels = _batch(7)
    explained = torch._dynamo.explain(model)(tokens, labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    frames = None
    for T in (7, 11, 16, 5):  # the sequence length changes: one graph serves them all
        tokens, labels = _batch(T)
        torch._dynamo.mark_dynamic(tokens, 1)
        torch._dynamo.mark_dynamic(labels, 1)
        with torch._dynamo.config.patch(error_on_recompile=frames is not None):
            got_loss, got = _loss_and_grads(model, tokens, labels, call=compiled)
        frames = counter.frame_count if frames is None else frames
        want_loss, want = _loss_and_grads(model, tokens, labels)
        torch.testing.assert_close(got_loss, want_loss, msg=f"T={T} loss")
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=f"T={T} grad {name}")
    assert counter.frame_count == frames == 1, f"compiled {counter.frame_count} frames for four sequence lengths"


# --------------------------------------------------------------------------------------------
# torch.autocast("cpu", dtype=torch.bfloat16)
# --------------------------------------------------------------------------------------------


def test_autocast_bf16_cross_entropy_in_a_model():
    """Under autocast the classifier gives bf16 logits; crossent returns a float32 loss and a bf16
    gradient of the logits, both judged against the oracle on those very logits (§6 at bf16)."""
    torch.manual_seed(0)
    model = TinyLM("ce", V=301, D=24)
    tokens, labels = _batch(9, V=301)
    seen = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        seen["logits"] = output

    model.head.register_forward_hook(keep_logits)
    with torch.autocast("cpu", dtype=bf16):
        loss = model(tokens, labels)
    assert loss.dtype == f32
    loss.backward()
    logits = seen["logits"]
    assert logits.dtype == bf16 and logits.grad.dtype == bf16
    for name, p in model.named_parameters():
        assert p.grad.dtype == f32 and torch.isfinite(p.grad).all(), name

    x, y = logits.detach()[:, :-1], labels[:, 1:]
    kw = dict(model.options, reduction="mean")
    xr = x.to(f64).requires_grad_()
    ref = R.cross_entropy(xr, y, **kw)
    ref.backward()
    xb = x.clone().requires_grad_()
    base, _ = CE.torch_at_dtype(xb, y, None, **kw)
    base.backward()
    assert_close_to_reference("autocast loss", loss, ref, base, bf16)
    assert_close_to_reference("autocast d logits", logits.grad[:, :-1], xr.grad, xb.grad, bf16)
    assert torch.count_nonzero(logits.grad[:, -1]) == 0


def test_autocast_bf16_linear_cross_entropy_in_a_model():
    """Under autocast the hidden states are bf16 and the float32 classifier weight is cast as
    F.linear casts it; the weight's gradient comes back in float32."""
    torch.manual_seed(0)
    model = TinyLM("linear", V=301, D=24)
    tokens, labels = _batch(9, V=301)
    seen = {}

    def keep_hidden(module, inputs, output):
        seen["h"] = output

    model.mix.register_forward_hook(keep_hidden)
    with torch.autocast("cpu", dtype=bf16):
        loss = model(tokens, labels)
        h = seen["h"]
        assert h.dtype == bf16
    # the hidden states that reach the loss are tanh(mix(...)) at bf16
    assert loss.dtype == f32
    loss.backward()
    W = model.head.weight
    assert W.grad.dtype == f32 and torch.isfinite(W.grad).all()
    for name, p in model.named_parameters():
        assert p.grad.dtype == f32 and torch.isfinite(p.grad).all(), name

    hidden = torch.tanh(h.detach())  # what the loss saw (tanh of a bf16 tensor stays bf16)
    weight = W.detach().to(bf16)  # autocast's cast of the float32 weight
    upstream = torch.tensor(1.0, dtype=f64)
    kw = dict(model.options, reduction="mean", shift=1)
    ref_loss, _, ref = LCE.run_reference(hidden, weight, None, labels, None, upstream, **kw)
    base_loss, _, base = LCE.run_torch(hidden, weight, None, labels, None, upstream, **kw)
    assert_close_to_reference("autocast loss", loss, ref_loss, base_loss, bf16)
    # the weight's gradient (cast back to float32) is that of its bf16 copy
    assert_close_to_reference("autocast grad W", W.grad, ref["w"], base["w"].float(), bf16)


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss, inplace", [("ce", False), ("ce", True), ("linear", False)])
def test_activation_checkpointing_gives_the_same_gradients(loss, inplace):
    """torch.utils.checkpoint (use_reentrant=False) around the classifier and the loss: the
    region's forward runs again in backward; the gradients are the same bits."""
    torch.manual_seed(0)
    plain = TinyLM(loss, inplace=inplace)
    ckpt = copy.deepcopy(plain)
    ckpt.ckpt = True
    for T in (6, 13):
        tokens, labels = _batch(T, key="ckpt")
        want_loss, want = _loss_and_grads(plain, tokens, labels)
        got_loss, got = _loss_and_grads(ckpt, tokens, labels)
        assert torch.equal(got_loss, want_loss)
        for name in want:
            assert torch.equal(got[name], want[name]), f"T={T} grad {name} differs under checkpointing"


# --------------------------------------------------------------------------------------------
# Determinism: identical calls give identical bits
# --------------------------------------------------------------------------------------------


def _ce_call(impl, dtype, soft, inplace, seed=0):
    g = gen(f"det-ce-{impl}-{dtype}-{soft}-{inplace}-{seed}")
    N, V = 24, 300
    x = (torch.randn(N, V, generator=g) * 3).to(dtype)
    if soft:
        target = torch.softmax(torch.randn(N, V, generator=g), -1).to(dtype)
        kw = {}
    else:
        target = torch.randint(0, V, (N,), generator=g)
        target[::5] = -100
        kw = dict(weight=(torch.rand(V, generator=g) + 0.5).to(dtype))
    kw.update(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, logit_scale=0.9, return_aux=True, impl=impl)
    upstream = torch.rand(N, generator=g) + 0.5

    def call():
        leaf = x.clone().requires_grad_()
        loss, aux = crossent.cross_entropy(leaf * 1, target, reduction="none", inplace_backward=inplace, **kw)
        loss.backward(upstream)
        return [loss.detach(), leaf.grad, *aux]

    return call


def _linear_call(schedule, dtype, seed=0):
    g = gen(f"det-linear-{schedule}-{dtype}-{seed}")
    N, D, V = 20, 13, 301
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / 4).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[::4] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, schedule=schedule, return_aux=True, chunk_size=7)

    def call():
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss, aux = crossent.linear_cross_entropy(h, w, target, bias=b, **kw)
        (loss * 1.75).backward()
        return [loss.detach(), h.grad, w.grad, b.grad, *aux]

    return call


def _assert_same_bits(first, second, what):
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: output {i}"
        assert torch.equal(a, b), f"{what}: output {i} differs between identical calls"


DETERMINISM = [
    ("torch-f32-hard", lambda: _ce_call("torch", f32, False, False)),
    ("torch-bf16-soft-inplace", lambda: _ce_call("torch", bf16, True, True)),
    ("torch-f16-hard-inplace", lambda: _ce_call("torch", f16, False, True)),
    ("linear-token-f32", lambda: _linear_call("token", f32)),
    ("linear-vocab-bf16", lambda: _linear_call("vocab", bf16)),
    ("linear-auto-f64", lambda: _linear_call("auto", f64)),
]


@pytest.mark.parametrize("name, make", DETERMINISM, ids=[d[0] for d in DETERMINISM])
def test_identical_calls_give_identical_bits(name, make):
    call = make()
    first = call()
    other = _ce_call("torch", f32, False, False, seed=1) if "linear" in name else _linear_call("token", f32, 1)
    other()  # an unrelated call in between leaves nothing behind
    _assert_same_bits(first, call(), name)


@pytest.mark.parametrize("grad_in_forward", [None, True, False])
@pytest.mark.parametrize("dtype, soft, inplace", [(f32, False, False), (bf16, True, False), (f16, False, True)])
def test_identical_calls_give_identical_bits_triton_interpreter(monkeypatch, grad_in_forward, dtype, soft, inplace):
    kernels = internals.triton_cross_entropy()
    monkeypatch.setattr(kernels, "MAX_BLOCK_V", 64)  # several vocabulary blocks: the online merge runs
    monkeypatch.setattr(kernels, "GRAD_IN_FORWARD", grad_in_forward)
    call = _ce_call("triton", dtype, soft, inplace)
    _assert_same_bits(call(), call(), f"triton {dtype} soft={soft} inplace={inplace}")


# --------------------------------------------------------------------------------------------
# Threads: two threads calling the losses at once get correct results
# --------------------------------------------------------------------------------------------


def _thread_cases():
    """(name, run) pairs; ``run()`` computes a loss and its gradients and checks them against the
    float64 oracle with the §6 rule (the PyTorch formula at that dtype as the baseline)."""
    cases = []
    for i, (dtype, reduction) in enumerate([(f32, "mean"), (bf16, "none"), (f32, "sum"), (bf16, "mean")]):
        g = gen(f"thread-ce-{i}")
        N, V = 16 + 3 * i, 200 + 17 * i
        x = (torch.randn(N, V, generator=g) * 3).to(dtype)
        t = torch.randint(0, V, (N,), generator=g)
        t[::3] = -100
        kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=15.0)
        xr = x.to(f64).requires_grad_()
        ref = R.cross_entropy(xr, t, **kw)
        ref.sum().backward()
        xb = x.clone().requires_grad_()
        base, _ = CE.torch_at_dtype(xb, t, None, **kw)
        base.sum().backward()

        ref, base = ref.detach(), base.detach()

        def run_ce(x=x, t=t, kw=kw, ref=ref, ref_grad=xr.grad, base=base, base_grad=xb.grad):
            leaf = x.clone().requires_grad_()
            loss = crossent.cross_entropy(leaf, t, chunk_size=5, **kw)
            loss.sum().backward()
            assert_close_to_reference("thread loss", loss, ref, base, x.dtype)
            assert_close_to_reference("thread grad", leaf.grad, ref_grad, base_grad, x.dtype)

        cases.append((f"ce-{i}", run_ce))
    for i, schedule in enumerate(["token", "vocab"]):
        g = gen(f"thread-linear-{i}")
        N, D, V = 18 + i, 11, 250 + 31 * i
        hidden, weight = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) / 3
        t = torch.randint(0, V, (N,), generator=g)
        t[1::4] = -100
        kw = dict(reduction="mean", z_loss=1e-3, label_smoothing=0.1)
        one = torch.tensor(1.0, dtype=f64)
        ref_loss, _, ref = LCE.run_reference(hidden, weight, None, t, None, one, **kw)
        base_loss, _, base = LCE.run_torch(hidden, weight, None, t, None, one, **kw)

        def run_linear(h=hidden, w=weight, t=t, kw=kw, schedule=schedule, ref=(ref_loss, ref), base=(base_loss, base)):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            loss = crossent.linear_cross_entropy(hh, ww, t, schedule=schedule, chunk_size=4, **kw)
            loss.backward()
            assert_close_to_reference("thread linear loss", loss, ref[0], base[0], f32)
            assert_close_to_reference("thread linear grad h", hh.grad, ref[1]["h"], base[1]["h"], f32)
            assert_close_to_reference("thread linear grad w", ww.grad, ref[1]["w"], base[1]["w"], f32)

        cases.append((f"linear-{schedule}", run_linear))
    return cases


def test_two_threads_calling_the_losses_concurrently():
    cases = _thread_cases()
    errors: list[str] = []
    start = threading.Barrier(2)

    def worker(offset: int):
        start.wait()
        for round_ in range(15):
            for k in range(len(cases)):
                name, run = cases[(k + offset + round_) % len(cases)]  # the threads interleave differently
                try:
                    run()
                except Exception as error:  # reported from the main thread
                    errors.append(f"thread {offset} round {round_} {name}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in (0, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, "\n".join(errors[:10])


# --------------------------------------------------------------------------------------------
# Memory under pressure: the budget, what a call holds, and a budget of one byte
# --------------------------------------------------------------------------------------------

#: per-token scalars a call may keep beside its chunk (the (m, log S) pair, target terms, sums):
#: 16 eight-byte values per token
PER_TOKEN = 128
#: and a fixed allowance for 0-dim tensors and small bookkeeping
FIXED = 256 * 1024


def peak_allocated(fn):
    """``(fn(), bytes)``: the most PyTorch's CPU allocator held at once during ``fn`` beyond what
    was allocated before it, from the profiler's allocation and free events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return result, peak


def _ce_inputs(N, V, dtype=f32, key="mem"):
    g = gen(f"{key}-{N}-{V}-{dtype}")
    x = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100
    return x, t


def test_budget_is_settable_and_restorable(budget):
    default = internals.options_module().DEFAULT_MEMORY_BUDGET
    assert crossent.get_memory_budget() == default
    assert budget(12345) == default and crossent.get_memory_budget() == 12345
    assert crossent.set_memory_budget(None) == 12345 and crossent.get_memory_budget() == default
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="memory budget"):
            crossent.set_memory_budget(bad)
    assert crossent.get_memory_budget() == default


def test_automatic_chunk_follows_the_budget(budget):
    """Forward scratch (no gradient) at budgets of 16 KiB … 1 MiB: never above the budget (plus
    per-token scalars), and growing with it — the automatic chunk is derived from the budget."""
    N, V = 512, 4096  # a row is 16 KiB in float32
    x, t = _ce_inputs(N, V)
    held = {}
    for nbytes in (16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024):
        budget(nbytes)
        with torch.no_grad():
            _, held[nbytes] = peak_allocated(lambda: crossent.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3))
        assert held[nbytes] <= nbytes + PER_TOKEN * N + FIXED, f"budget {nbytes}: held {held[nbytes]}"
    sizes = sorted(held)
    for small, large in zip(sizes, sizes[1:], strict=False):
        grew = held[large] - held[small]
        assert grew >= (large - small) // 2, f"budget {small} → {large}: scratch grew by {grew} bytes only"


@pytest.mark.parametrize("dtype", [f32, bf16])
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh-grad", "inplace"])
def test_cross_entropy_holds_no_more_than_it_promises(budget, dtype, inplace):
    """Forward + backward beyond the inputs: one gradient tensor (none with inplace_backward)
    plus the budget's chunk plus per-token scalars — never a float32 copy of the logits."""
    N, V = 2048, 8192
    x, t = _ce_inputs(N, V, dtype)
    nbytes = 256 * 1024
    budget(nbytes)
    leaf = x.requires_grad_()
    logits = leaf * 1 if inplace else leaf  # in place: a non-leaf, as a model's output
    # d logits: autograd.grad returns it without accumulating a copy into .grad

    def step():
        loss = crossent.cross_entropy(logits, t, inplace_backward=inplace, label_smoothing=0.1, z_loss=1e-3)
        (grad,) = torch.autograd.grad(loss, logits)
        return grad

    grad, held = peak_allocated(step)
    gradient = 0 if inplace else N * V * x.element_size()
    promised = gradient + nbytes + PER_TOKEN * N + FIXED
    assert held <= promised, f"held {held / 2**20:.2f} MiB, promised {promised / 2**20:.2f} MiB"
    if inplace:
        assert grad.data_ptr() == logits.data_ptr()


LINEAR_MEMORY = [(f32, "token"), (f32, "vocab"), (bf16, "token"), (bf16, "vocab"), (bf16, "auto")]


@pytest.mark.parametrize("ignore", [False, True], ids=["all-kept", "some-ignored"])
@pytest.mark.parametrize(
    "dtype, schedule", LINEAR_MEMORY, ids=[f"{d}-{s}".replace("torch.", "") for d, s in LINEAR_MEMORY]
)
def test_linear_overhead_is_bounded_by_the_budget_and_not_by_n(budget, dtype, schedule, ignore):
    """Beyond the inputs and their gradients a call holds the budget's chunk and per-token
    scalars, and apart from the documented accumulators the overhead does not grow with N
    (DESIGN.md §4). A 16-bit weight under "token" adds its float32 gradient accumulator and
    float32 copy (4 bytes per weight element each); under "vocab" a 16-bit hidden, or dropped
    ignored tokens, add the float32 copy of the kept hidden rows and the float32 ∂hidden
    accumulator (4 bytes per kept hidden element each; docs/guide.md, the two schedules).
    ("auto" takes "vocab" here: the token accumulator would exceed the budget.)"""
    choose_schedule = internals.torch_linear().choose_schedule
    D, V = 128, 512
    nbytes = 192 * 1024
    budget(nbytes)
    chosen = choose_schedule(schedule, V, D, torch.empty(V, D, dtype=dtype), True)
    assert schedule != "auto" or chosen == "vocab"
    weight_accumulator = 2 * 4 * V * D if chosen == "token" and dtype != f32 else 0
    overhead = {}
    for N in (1024, 4096):
        g = gen(f"linear-mem-{N}")
        hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
        weight = (torch.randn(V, D, generator=g) / 8).to(dtype).requires_grad_()
        t = torch.randint(0, V, (N,), generator=g)
        if ignore:
            t[::9] = -100

        def step(hidden=hidden, weight=weight, t=t):
            loss = crossent.linear_cross_entropy(hidden, weight, t, schedule=schedule, z_loss=1e-3)
            return torch.autograd.grad(loss, (hidden, weight))

        _, held = peak_allocated(step)
        gradients = (N * D + V * D) * hidden.element_size()
        kept = int((t != -100).sum())
        hidden_accumulator = 2 * 4 * kept * D if chosen == "vocab" and (dtype != f32 or ignore) else 0
        overhead[N] = held - gradients - hidden_accumulator
        promised = nbytes + weight_accumulator + PER_TOKEN * N + FIXED
        assert overhead[N] <= promised, (
            f"N={N}: {overhead[N] / 2**20:.2f} MiB beyond the gradients, promised {promised / 2**20:.2f} MiB "
            f"({nbytes / 2**20:.2f} MiB budget)"
        )
    growth = (overhead[4096] - overhead[1024]) / (4096 - 1024)
    assert growth <= PER_TOKEN, f"the overhead grows by {growth:.0f} bytes per token (D={D}): with N, not the budget"


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_one_byte_budget_runs_one_token_per_chunk(budget, soft):
    """A budget of 1 byte still runs: one row per chunk (scratch of a few rows at most), the same
    bits as ``chunk_size=1``, and the same loss as the default budget by the §6 rule."""
    N, V = 64, 4096
    x, t = _ce_inputs(N, V, key="tiny")
    if soft:
        t = torch.softmax(torch.randn(N, V, generator=gen("tiny-soft")), -1)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, return_aux=True)

    def run(**extra):
        leaf = x.clone().requires_grad_()
        loss, aux = crossent.cross_entropy(leaf, t, **kw, **extra)
        loss.backward()
        return [loss.detach(), leaf.grad, *aux]

    default = run()
    explicit = run(chunk_size=1)
    budget(1)
    with torch.no_grad():
        _, held = peak_allocated(lambda: crossent.cross_entropy(x, t, **kw))
    row = V * 4
    assert held <= 4 * row + PER_TOKEN * N + FIXED, f"a 1-byte budget held {held} bytes (a row is {row})"
    tiny = run()
    _assert_same_bits(tiny, explicit, "budget of 1 byte vs chunk_size=1")
    xr = x.to(f64).requires_grad_()
    ref = R.cross_entropy(xr, t.to(f64) if soft else t, **{k: v for k, v in kw.items() if k != "return_aux"})
    ref.backward()
    xb = x.clone().requires_grad_()
    base, _ = CE.torch_at_dtype(xb, t, None, reduction="mean", **{k: v for k, v in kw.items() if k != "return_aux"})
    base.backward()
    for name, got in (("tiny budget", tiny), ("default budget", default)):
        assert_close_to_reference(f"{name} loss", got[0], ref, base, f32)
        assert_close_to_reference(f"{name} grad", got[1], xr.grad, xb.grad, f32)


@pytest.mark.parametrize("schedule", ["token", "vocab"])
def test_one_byte_budget_linear(budget, schedule):
    """linear_cross_entropy at a budget of 1 byte: one token (or one vocabulary row) per chunk,
    the same bits as ``chunk_size=1``, right by the §6 rule."""
    g = gen(f"tiny-linear-{schedule}")
    N, D, V = 12, 9, 40
    hidden, weight = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) / 3
    bias = torch.randn(V, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[2] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3, schedule=schedule)

    def run(**extra):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        loss = crossent.linear_cross_entropy(h, w, t, bias=b, **kw, **extra)
        loss.backward()
        return [loss.detach(), h.grad, w.grad, b.grad]

    explicit = run(chunk_size=1)
    budget(1)
    tiny = run()
    _assert_same_bits(tiny, explicit, f"{schedule}: budget of 1 byte vs chunk_size=1")
    one = torch.tensor(1.0, dtype=f64)
    ref_loss, _, ref = LCE.run_reference(hidden, weight, bias, t, None, one, **_reference_options(kw))
    base_loss, _, base = LCE.run_torch(hidden, weight, bias, t, None, one, **_reference_options(kw))
    assert_close_to_reference("loss", tiny[0], ref_loss, base_loss, f32)
    for key, got in zip("hwb", tiny[1:], strict=True):
        assert_close_to_reference(f"grad {key}", got, ref[key], base[key], f32)


def _reference_options(kw):
    return dict(reduction="mean", label_smoothing=kw["label_smoothing"], z_loss=kw["z_loss"])
