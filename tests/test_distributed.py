"""crossent.distributed across processes: gloo on the CPU, judged against the float64 oracle.

One spawned world of four processes (file-based init, a process-group timeout) runs every
multi-process case, because starting processes is the slow part: the 4-rank cases over the whole
world, the 2-rank cases over the subgroups {0, 1} and {2, 3} (each pair takes half of the table),
and the gradient-accumulation recipe under DDP on both pairs. Each rank writes its results to a
file; the tests below read them and compare them, here in the parent, with
``crossent.reference`` (float64) on the concatenated vocabulary and with plain PyTorch at the
input dtype (the DESIGN.md §6 tolerance rule, ``judge.py``). Every torch.distributed call a
loss makes is counted (the module's functions are wrapped inside each rank) and held to the
budget: forward two collectives of O(N) elements, the logits' backward none, the linear
backward one all-reduce of ``∂loss/∂hidden``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import crossent
from crossent import reference as R
from crossent.distributed import global_normalizer, vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from helpers.common import gen, output_dtype
from judge import assert_close_to_reference, rel_error

f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = {"f64": f64, "f32": f32, "f16": f16, "bf16": bf16}
WORLD = 4
D = 6  # hidden size of the linear cases
PROCESS_GROUP_TIMEOUT = timedelta(seconds=60)

pytestmark = pytest.mark.timeout(240)


# --------------------------------------------------------------------------------------------
# The table: chosen for coverage (every option, reduction and dtype; padding; empty shards)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    kind: str = "logits"  # "logits" (vocab_parallel_cross_entropy) | "linear"
    P: int = 2  # ranks the vocabulary is split over (2: a pair of the world of 4; 4: the world)
    Vl: int = 10  # vocabulary columns per rank
    V: int | None = None  # the real vocabulary (None: P·Vl, no padding)
    lead: tuple = (11,)
    layout: str = "contig"  # "contig" | "transpose" (a (B, T) lead stored (T, B)): logits only
    dtype: str = "f32"
    reduction: str = "mean"
    weight: str | None = None  # None | "rand" | "zero_kept"
    eps: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    scale: float = 1.0
    ignore: float = 0.0  # fraction of tokens set to ignore_index
    ignore_index: int = -100
    targets: str = "any"  # "any" | "rank0" (every target in rank 0's slice) | "uniform" (all logits 0)
    chunk: int | None = None
    aux: bool = False
    upstream: str = "random"  # "unit" | "random"
    bias: bool = True  # linear only
    shift: int = 0  # linear only
    grads: str = "hwb"  # linear only: which of hidden, weight, bias require grad
    pair: int = 0  # 2-rank cases: which pair of the world runs it

    @property
    def Vtrue(self) -> int:
        return self.V if self.V is not None else self.P * self.Vl


ALL = dict(weight="rand", eps=0.1, z_loss=1e-3, softcap=8.0, scale=0.5, aux=True)
BT = (3, 5)

CASES = [
    # --- vocab_parallel_cross_entropy over 4 ranks
    Case("L4-f32-mean-pad-all-chunk3", P=4, V=37, ignore=0.2, chunk=3, **ALL),
    Case(
        "L4-f64-none-rank3-only-padding-eps-ii3",
        P=4,
        dtype="f64",
        V=29,
        reduction="none",
        eps=0.2,
        aux=True,
        ignore=0.2,
        ignore_index=3,
    ),
    Case(
        "L4-bf16-sum-BT-transpose-zloss",
        P=4,
        dtype="bf16",
        lead=BT,
        layout="transpose",
        reduction="sum",
        z_loss=1e-2,
        aux=True,
    ),
    Case("L4-f32-mean-targets-on-rank0-eps-weight", P=4, targets="rank0", eps=0.1, weight="rand", aux=True),
    Case("L4-f32-mean-all-ignored", P=4, V=33, ignore=1.0, weight="rand", z_loss=1e-3, aux=True),
    Case("L4-f64-mean-zero-kept-weight", P=4, dtype="f64", weight="zero_kept", ignore=0.2, eps=0.1),
    Case("L4-f32-sum-large-V", P=4, Vl=600, V=2399, lead=(5,), reduction="sum", eps=0.1, aux=True),
    # --- vocab_parallel_cross_entropy over 2 ranks (two pairs at once)
    Case("L2-f32-mean-plain-unit", upstream="unit"),
    Case("L2-f32-sum-weight-eps", reduction="sum", weight="rand", eps=0.1, pair=1),
    Case("L2-f16-none-eps-zloss-aux", dtype="f16", reduction="none", eps=0.1, z_loss=1e-2, aux=True),
    Case("L2-f64-mean-pad-softcap-scale-aux", dtype="f64", Vl=21, V=41, softcap=5.0, scale=-0.5, aux=True, pair=1),
    Case("L2-f32-none-ii-real-class-chunk1", reduction="none", ignore=0.3, ignore_index=4, chunk=1),
    Case("L2-bf16-mean-BT-all", dtype="bf16", lead=BT, ignore=0.2, pair=1, **ALL),
    Case("L2-f32-mean-uniform-pad-aux", V=17, targets="uniform", aux=True),
    Case("L2-f64-sum-targets-on-rank0-zloss", dtype="f64", targets="rank0", reduction="sum", z_loss=1e-2, pair=1),
    # --- vocab_parallel_linear_cross_entropy over 4 ranks
    Case("W4-f32-mean-pad-all-shift1-chunk3", kind="linear", P=4, V=37, lead=BT, shift=1, ignore=0.2, chunk=3, **ALL),
    Case(
        "W4-f64-none-rank3-only-padding-eps", kind="linear", P=4, dtype="f64", V=29, reduction="none", eps=0.2, aux=True
    ),
    Case(
        "W4-f32-sum-targets-on-rank0-nobias",
        kind="linear",
        P=4,
        targets="rank0",
        reduction="sum",
        bias=False,
        eps=0.1,
        weight="rand",
    ),
    Case("W4-bf16-mean-zloss-aux", kind="linear", P=4, dtype="bf16", z_loss=1e-2, aux=True, ignore=0.2),
    # --- vocab_parallel_linear_cross_entropy over 2 ranks
    Case("W2-f32-mean-plain-unit", kind="linear", upstream="unit", bias=False),
    Case("W2-f64-mean-all-shift2-aux", kind="linear", dtype="f64", lead=BT, shift=2, V=19, ignore=0.2, pair=1, **ALL),
    Case("W2-f32-none-softcap-ignore", kind="linear", reduction="none", softcap=5.0, ignore=0.3),
    Case("W2-f32-sum-all-ignored", kind="linear", reduction="sum", ignore=1.0, z_loss=1e-3, pair=1),
    Case("W2-f32-mean-frozen-head", kind="linear", grads="h", eps=0.1, ignore=0.2),
    Case("W2-f32-mean-frozen-hidden", kind="linear", grads="wb", weight="rand", pair=1),
    Case("W2-bf16-none-weight-scale", kind="linear", dtype="bf16", reduction="none", weight="rand", scale=0.25),
]


def test_table_covers_what_the_issue_asks():
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    for kind in ("logits", "linear"):
        mine = [c for c in CASES if c.kind == kind]
        assert {c.P for c in mine} == {2, 4}
        assert {c.reduction for c in mine} == {"mean", "sum", "none"}
        assert {c.dtype for c in mine} >= {"f32", "f64", "bf16"}
        assert any(c.Vtrue < c.P * c.Vl for c in mine), "a padded vocabulary"
        assert any(c.Vtrue <= (c.P - 1) * c.Vl for c in mine), "a rank holding only padding"
        assert any(c.targets == "rank0" for c in mine), "shards whose slice holds no target"
        assert any(c.ignore == 1.0 for c in mine) and any(0 < c.ignore < 1 for c in mine)
        for option in ("weight", "eps", "z_loss", "softcap", "scale", "aux", "chunk"):
            assert any(getattr(c, option) != getattr(Case("default"), option) for c in mine), option
    assert {c.pair for c in CASES if c.P == 2} == {0, 1}


# --------------------------------------------------------------------------------------------
# Inputs (made here, in the parent, and sent to the ranks) and per-rank runs
# --------------------------------------------------------------------------------------------


def make_inputs(case: Case) -> dict:
    g = gen(case.id)
    dtype = DTYPES[case.dtype]
    gen_dtype = f64 if dtype == f64 else f32
    Vp, V = case.P * case.Vl, case.Vtrue
    N = math.prod(case.lead)
    if case.targets == "rank0":
        target = torch.randint(0, case.Vl, case.lead, generator=g)
    else:
        target = torch.randint(0, V, case.lead, generator=g)
    drop = torch.randperm(N, generator=g)[: round(case.ignore * N)]
    target.view(-1)[drop] = case.ignore_index
    out = {"target": target}
    if case.kind == "logits":
        shape = case.lead + (Vp,)
        if case.layout == "transpose":
            shape = (case.lead[1], case.lead[0], Vp)
        base = torch.randn(shape, generator=g, dtype=gen_dtype) * 3
        base[..., V:] = 50.0  # padding: it would dominate every row if it were not masked
        if case.targets == "uniform":
            base[..., :V] = 0.0
            target.view(-1)[:3] = torch.tensor([0, case.Vl, V - 1])  # hits at the first index only
        out["logits"] = base.to(dtype)
    else:
        out["hidden"] = (torch.randn(case.lead + (D,), generator=g, dtype=gen_dtype)).to(dtype)
        weight = torch.randn(Vp, D, generator=g, dtype=gen_dtype)
        weight[V:] = 20.0  # padding rows: huge logits if they were not masked
        out["weight"] = weight.to(dtype)
        out["bias"] = (torch.randn(Vp, generator=g, dtype=gen_dtype)).to(dtype) if case.bias else None
    cw = None
    if case.weight is not None:
        cw = torch.rand(V, generator=g, dtype=f64) + 0.5
        if case.weight == "zero_kept":
            kept = target[target != case.ignore_index]
            cw[kept] = 0.0
        cw = cw.to(dtype)
    out["class_weight"] = cw
    lead = case.lead
    if case.reduction == "none":
        up = torch.randint(1, 8, lead, generator=g).to(f64) / 4
    else:
        up = torch.tensor(1.0 if case.upstream == "unit" else 0.75, dtype=f64)
    out["upstream"] = up
    return out


def _view(case: Case, t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1) if case.layout == "transpose" else t


def _options(case: Case) -> dict:
    return dict(
        ignore_index=case.ignore_index,
        reduction=case.reduction,
        label_smoothing=case.eps,
        z_loss=case.z_loss,
        softcap=case.softcap,
        logit_scale=case.scale,
    )


COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "all_gather_object", "broadcast",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
    "send", "recv", "isend", "irecv", "barrier", "all_reduce_coalesced",
)  # fmt: skip


def _count_collectives(log: list) -> None:
    """Wrap every torch.distributed collective so that each outermost call appends
    ``(name, [numel of each tensor argument])`` to ``log``."""
    depth = [0]

    def numels(args) -> list[int]:
        out = []
        for a in args:
            if isinstance(a, torch.Tensor):
                out.append(a.numel())
            elif isinstance(a, (list, tuple)):
                out += [t.numel() for t in a if isinstance(t, torch.Tensor)]
        return out

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            if depth[0] == 0:
                log.append((_name, numels(args) + numels(kwargs.values())))
            depth[0] += 1
            try:
                return _fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(dist, name, wrapper)


def _run_case(case: Case, inputs: dict, group, log: list) -> dict:
    r = dist.get_rank(group)
    assert dist.get_world_size(group) == case.P
    cols = slice(r * case.Vl, (r + 1) * case.Vl)
    target, cw = inputs["target"], inputs["class_weight"]
    kw = _options(case)
    if case.kind == "logits":
        leaf = inputs["logits"].clone().requires_grad_()
        shard = _view(case, leaf)[..., cols]  # a strided view: rows of Vp columns
        mark = len(log)
        out = vocab_parallel_cross_entropy(
            shard, target, group=group, vocab_size=case.V, weight=cw, chunk_size=case.chunk, return_aux=case.aux, **kw
        )
    else:
        h = inputs["hidden"].clone().requires_grad_("h" in case.grads)
        w_leaf = inputs["weight"].clone().requires_grad_("w" in case.grads)
        b_leaf = inputs["bias"].clone().requires_grad_("b" in case.grads) if case.bias else None
        mark = len(log)
        out = vocab_parallel_linear_cross_entropy(
            h, w_leaf[cols], target, bias_shard=b_leaf[cols] if case.bias else None, group=group,
            vocab_size=case.V, class_weight=cw, chunk_size=case.chunk, return_aux=case.aux, shift=case.shift, **kw,
        )  # fmt: skip
    forward = log[mark:]
    loss, aux = out if case.aux else (out, None)
    mark = len(log)
    loss.backward(inputs["upstream"].to(loss.dtype))
    backward = log[mark:]
    result = dict(loss=loss.detach(), aux=tuple(aux) if aux is not None else None, forward=forward, backward=backward)
    if case.kind == "logits":
        result["grad"] = _view(case, leaf.grad)[..., cols]
    else:
        result["h"] = h.grad
        result["w"] = w_leaf.grad[cols] if w_leaf.grad is not None else None
        result["b"] = b_leaf.grad[cols] if case.bias and b_leaf.grad is not None else None
    return result


def _run_recipe(spec: dict, group) -> dict:
    """The README recipe: reduction="sum" / global_normalizer · world size, under DDP, over three
    micro-batches with different valid-token counts; returns the accumulated gradient."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = torch.nn.Linear(spec["weight"].shape[1], spec["weight"].shape[0], dtype=spec["weight"].dtype)
    with torch.no_grad():
        model.weight.copy_(spec["weight"])
        model.bias.copy_(spec["bias"])
    ddp = DDP(model, process_group=group)
    me = spec["batches"][dist.get_rank(group)]
    world = dist.get_world_size(group)
    cw = spec["class_weight"]
    normalizer = global_normalizer([t for _, t in me], weight=cw, group=group)
    for k, (x, t) in enumerate(me):
        last = k == len(me) - 1
        with torch.enable_grad() if last else ddp.no_sync():
            loss_sum = crossent.cross_entropy(ddp(x), t, weight=cw, label_smoothing=spec["eps"], reduction="sum")
            (loss_sum * world / normalizer).backward()
    return dict(normalizer=normalizer, weight=model.weight.grad, bias=model.bias.grad)


def _dtensor_messages() -> dict:
    """The errors a sharded DTensor weight gets (FSDP2's fully_shard makes such weights)."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    local = torch.randn(5, 4)
    weight = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    hidden, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    messages = {}
    for name, fn in (
        ("linear_cross_entropy", lambda: crossent.linear_cross_entropy(hidden, weight, target)),
        ("vocab_parallel_linear_cross_entropy", lambda: vocab_parallel_linear_cross_entropy(hidden, weight, target)),
    ):
        try:
            fn()
        except TypeError as error:
            messages[name] = str(error)
    return messages


def _worker(rank: int, world: int, store: str, inputs_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=PROCESS_GROUP_TIMEOUT
    )
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        pair = pairs[rank // 2]
        payload = torch.load(inputs_path, weights_only=False)
        log: list = []
        _count_collectives(log)
        results = {}
        for fields, inputs in payload["cases"]:
            case = Case(**fields)
            if case.P == world:
                results[case.id] = _run_case(case, inputs, None, log)
            elif case.P == 2 and case.pair == rank // 2:
                results[case.id] = _run_case(case, inputs, pair, log)
        results["recipe"] = _run_recipe(payload["recipe"][rank // 2], pair)
        results["dtensor"] = _dtensor_messages()
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


RECIPE_SIZES = [[4, 9, 2], [7, 3, 5]]  # valid tokens of the three micro-batches on each rank of a pair


def make_recipe(pair: int) -> dict:
    """Pair 0: float64, plain; pair 1: float32 with class weights and label smoothing."""
    g = gen(f"recipe-{pair}")
    dtype = f64 if pair == 0 else f32
    V, Dm = 13, 5
    batches = []
    for sizes in RECIPE_SIZES:
        mine = []
        for n in sizes:
            x = torch.randn(n + 3, Dm, generator=g, dtype=f64).to(dtype)
            t = torch.randint(0, V, (n + 3,), generator=g)
            t[torch.randperm(n + 3, generator=g)[:3]] = -100  # 3 ignored tokens each: n valid ones
            mine.append((x, t))
        batches.append(mine)
    return dict(
        weight=(torch.randn(V, Dm, generator=g, dtype=f64) * 0.5).to(dtype),
        bias=torch.randn(V, generator=g, dtype=f64).to(dtype),
        batches=batches,
        class_weight=(torch.rand(V, generator=g, dtype=f64) + 0.5).to(dtype) if pair == 1 else None,
        eps=0.1 if pair == 1 else 0.0,
    )


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Run the whole table in one spawned world of four gloo processes; per-rank results."""
    tmp = tmp_path_factory.mktemp("distributed")
    inputs_path = str(tmp / "inputs.pt")
    payload = dict(
        cases=[(asdict(c), make_inputs(c)) for c in CASES],
        recipe=[make_recipe(0), make_recipe(1)],
    )
    torch.save(payload, inputs_path)
    mp.spawn(_worker, args=(WORLD, str(tmp / "store"), inputs_path, str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _ranks_of(case: Case) -> list[int]:
    return list(range(WORLD)) if case.P == WORLD else [2 * case.pair, 2 * case.pair + 1]


# --------------------------------------------------------------------------------------------
# The single-process answers: the float64 oracle and plain PyTorch at the input dtype
# --------------------------------------------------------------------------------------------


def _composed(z, t2, weight, *, reduction, ignore_index, label_smoothing, z_loss, softcap, logit_scale, lead):
    """The loss in plain PyTorch (F.cross_entropy + c·w_y·lse²) on (N, V) logits at their dtype."""
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ce = F.cross_entropy(
        z, t2, weight=weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    keep = t2 != ignore_index
    y = torch.where(keep, t2, 0)
    w_y = torch.ones(y.shape, dtype=z.dtype) if weight is None else weight[y]
    w_y = torch.where(keep, w_y, torch.zeros_like(w_y))
    denominator = w_y.sum()
    lse = torch.logsumexp(z, -1)
    zl = torch.where(keep, z_loss * w_y * lse * lse, torch.zeros_like(ce)) if z_loss else torch.zeros_like(ce)

    def reduce(v):
        if reduction == "none":
            return v.reshape(lead)
        total = v.sum()
        if reduction == "sum":
            return total
        safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        return torch.where(denominator != 0, total / safe, torch.zeros_like(total))

    with torch.no_grad():
        n = keep.sum()
        aux = dict(
            ce=reduce(ce.detach()),
            z_loss=reduce(zl.detach()),
            lse=lse.reshape(lead),
            entropy=-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1).reshape(lead),
            n_tokens=n,
            weight_sum=denominator,
            accuracy=((z.argmax(-1) == y) & keep).sum().to(z.dtype) / n.clamp(min=1),
        )
    return reduce(ce + zl), aux


def _shifted(target: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    if not shift:
        return target
    out = torch.full_like(target, ignore_index)
    out[..., :-shift] = target[..., shift:]
    return out


def single_process(case: Case, inputs: dict) -> tuple[dict, dict]:
    """(oracle, PyTorch) answers on the concatenated, unpadded vocabulary: loss, aux, gradients."""
    V, kw = case.Vtrue, _options(case)
    up = inputs["upstream"]
    cw = inputs["class_weight"]
    target = inputs["target"]
    answers = []
    for dtype in (f64, DTYPES[case.dtype]):
        leaves = {}
        if case.kind == "logits":
            leaves["grad"] = _view(case, inputs["logits"]).to(dtype, copy=True).requires_grad_()
            x = leaves["grad"][..., :V]
            t = target
        else:
            leaves["h"] = inputs["hidden"].to(dtype, copy=True).requires_grad_("h" in case.grads)
            leaves["w"] = inputs["weight"].to(dtype, copy=True).requires_grad_("w" in case.grads)
            leaves["b"] = inputs["bias"].to(dtype, copy=True).requires_grad_("b" in case.grads) if case.bias else None
            x = leaves["h"] @ leaves["w"][:V].T
            if case.bias:
                x = x + leaves["b"][:V]
            t = _shifted(target, case.shift, case.ignore_index)
        w = cw.to(dtype) if cw is not None else None
        if dtype == f64:
            out = R.cross_entropy(x, t, weight=w, return_aux=True, **kw)
            loss, aux = out[0], out[1]._asdict()
        else:
            loss, aux = _composed(x.reshape(-1, V), t.reshape(-1), w, lead=t.shape, **kw)
        if loss.requires_grad:
            loss.backward(up.to(loss.dtype))
        grads = {k: (v.grad if v is not None else None) for k, v in leaves.items()}
        answers.append(dict(loss=loss.detach(), aux=aux, keep=t != case.ignore_index, **grads))
    return answers[0], answers[1]


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def _check_collectives(case: Case, got: dict, n: int) -> None:
    """Forward: one all-gather of the (m, S) pairs and one all-reduce of at most 4 packed
    columns, both O(n); backward: nothing (logits) or one all-reduce of n·D (linear)."""
    fwd, bwd = got["forward"], got["backward"]
    names = sorted(name for name, _ in fwd)
    assert len(fwd) <= 2 and names == ["all_gather_single", "all_reduce"], f"{case.id}: forward made {fwd}"
    sizes = dict(fwd)
    assert sizes["all_gather_single"] == [2 * case.P * n, 2 * n], f"{case.id}: {fwd}"
    (packed,) = sizes["all_reduce"]
    assert packed % max(n, 1) == 0 and packed <= 4 * n, f"{case.id}: {fwd}"
    if case.kind == "logits" or "h" not in case.grads:
        assert bwd == [], f"{case.id}: backward communicated: {bwd}"
    else:
        assert bwd == [("all_reduce", [n * D])], f"{case.id}: backward made {bwd}"
    for _, numels in fwd + bwd:  # nothing of size V crosses the wire
        assert all(k <= max(2 * case.P * n, n * D) for k in numels), f"{case.id}: {fwd + bwd}"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_case_against_single_process_reference(spawned, case: Case):
    inputs = make_inputs(case)
    ranks = _ranks_of(case)
    results = [spawned[r][case.id] for r in ranks]
    dtype = DTYPES[case.dtype]
    ref, base = single_process(case, inputs)
    first = results[0]

    # loss and LossAux: the same bits on every rank
    for other in results[1:]:
        assert torch.equal(other["loss"], first["loss"]), f"{case.id}: the loss differs between ranks"
        if case.aux:
            for a, b in zip(first["aux"], other["aux"], strict=True):
                assert torch.equal(a, b), f"{case.id}: LossAux differs between ranks"
    loss = first["loss"]
    assert loss.dtype == output_dtype(dtype)
    assert_close_to_reference(f"{case.id} loss", loss, ref["loss"], base["loss"], dtype)
    keep = ref["keep"]
    if case.aux:
        aux = crossent.LossAux(*first["aux"])
        assert int(aux.n_tokens) == int(keep.sum())
        for name in ("ce", "z_loss", "lse", "entropy", "weight_sum", "accuracy"):
            value, want, torch_value = getattr(aux, name), ref["aux"][name], base["aux"][name]
            if case.kind == "linear" and name in ("lse", "entropy"):  # 0 where ignored, as linear_cross_entropy
                assert torch.count_nonzero(value[~keep]) == 0
                value, want, torch_value = value[keep], want[keep], torch_value[keep]
            rule = f32 if name in ("weight_sum", "accuracy") and dtype == f64 else dtype
            assert_close_to_reference(f"{case.id} aux.{name}", value, want, torch_value, rule)

    # gradients: the shards concatenated equal the single-process gradient; padding gets exact 0
    V = case.Vtrue
    if case.kind == "logits":
        grad = torch.cat([res["grad"] for res in results], dim=-1)
        assert grad.dtype == dtype
        assert torch.count_nonzero(grad[..., V:]) == 0, f"{case.id}: padding got a gradient"
        assert_close_to_reference(f"{case.id} grad", grad[..., :V], ref["grad"][..., :V], base["grad"][..., :V], dtype)
        n = keep.numel()
    else:
        n = int(keep.sum())  # CPU: ignored tokens are dropped before any product and any collective
        for key, cat in (("w", 0), ("b", 0)):
            if key not in case.grads or (key == "b" and not case.bias):
                assert all(res[key] is None for res in results)
                continue
            grad = torch.cat([res[key] for res in results], dim=cat)
            assert grad.dtype == dtype
            assert torch.count_nonzero(grad[V:]) == 0, f"{case.id}: padding rows got a gradient ({key})"
            assert_close_to_reference(f"{case.id} grad {key}", grad[:V], ref[key][:V], base[key][:V], dtype)
        if "h" in case.grads:
            for res in results[1:]:
                assert torch.equal(res["h"], first["h"]), f"{case.id}: grad of hidden differs between ranks"
            assert_close_to_reference(f"{case.id} grad h", first["h"], ref["h"], base["h"], dtype)
        else:
            assert all(res["h"] is None for res in results)
    if not bool(keep.any()):
        assert torch.count_nonzero(loss) == 0
    for res in results:
        _check_collectives(case, res, n)


def test_large_vocabulary_never_crosses_the_wire(spawned):
    """With V = 2399 over 4 ranks and 5 tokens, every collective is far smaller than V."""
    case = next(c for c in CASES if c.id == "L4-f32-sum-large-V")
    for r in range(WORLD):
        res = spawned[r][case.id]
        sizes = [k for _, numels in res["forward"] + res["backward"] for k in numels]
        assert len(res["forward"]) == 2 and res["backward"] == []
        assert max(sizes) == 2 * 4 * 5 < case.Vtrue / 50


def test_recipe_accumulated_gradient_equals_full_batch_mean(spawned):
    """2 ranks × 3 micro-batches with different valid-token counts, under DDP: the accumulated
    gradient equals the single-process mean over the whole global batch — and a mean of
    per-micro-batch means does not."""
    for pair in (0, 1):
        spec = make_recipe(pair)
        got = [spawned[2 * pair + i]["recipe"] for i in range(2)]
        x = torch.cat([xb for mine in spec["batches"] for xb, _ in mine])
        t = torch.cat([tb for mine in spec["batches"] for _, tb in mine])
        n_valid = sum(sum(sizes) for sizes in RECIPE_SIZES)
        cw = spec["class_weight"]
        expect_norm = n_valid if cw is None else float(cw.to(f64)[t[t != -100]].sum())
        for res in got:
            assert res["normalizer"].item() == pytest.approx(expect_norm, rel=1e-6)
        dtype = spec["weight"].dtype

        def full_batch(dt, x=x, t=t, spec=spec, cw=cw):
            w = spec["weight"].to(dt, copy=True).requires_grad_()
            b = spec["bias"].to(dt, copy=True).requires_grad_()
            weight = cw.to(dt) if cw is not None else None
            F.cross_entropy(F.linear(x.to(dt), w, b), t, weight=weight, label_smoothing=spec["eps"]).backward()
            return w.grad, b.grad

        ref_w, ref_b = full_batch(f64)
        base_w, base_b = full_batch(dtype)
        for res in got:  # DDP leaves the same averaged gradient on both ranks
            assert_close_to_reference(f"recipe {pair} grad weight", res["weight"], ref_w, base_w, dtype)
            assert_close_to_reference(f"recipe {pair} grad bias", res["bias"], ref_b, base_b, dtype)
        # the bug the recipe avoids: the mean of the six micro-batch means is measurably different
        w = spec["weight"].to(f64, copy=True).requires_grad_()
        means = [
            F.cross_entropy(F.linear(xb.to(f64), w, spec["bias"].to(f64)), tb,
                            weight=cw.to(f64) if cw is not None else None, label_smoothing=spec["eps"])
            for mine in spec["batches"] for xb, tb in mine
        ]  # fmt: skip
        (sum(means) / len(means)).backward()
        assert rel_error(w.grad, ref_w) > 1e-3


def test_dtensor_weight_gets_a_clear_error(spawned):
    """FSDP2 / DTensor: a sharded weight given to linear_cross_entropy raises a TypeError that
    says what to do (LinearCrossEntropyHead, or full_tensor()); the vocabulary-parallel loss says
    to pass the local shard."""
    for r in range(WORLD):
        messages = spawned[r]["dtensor"]
        plain = messages["linear_cross_entropy"]
        assert "DTensor" in plain and "LinearCrossEntropyHead" in plain and "full_tensor()" in plain
        parallel = messages["vocab_parallel_linear_cross_entropy"]
        assert "DTensor" in parallel and "to_local()" in parallel and "group=" in parallel


# --------------------------------------------------------------------------------------------
# In this process: no process group (a world of one), validation, gradcheck, the normaliser
# --------------------------------------------------------------------------------------------


def test_import_initialises_nothing():
    import crossent.distributed  # noqa: F401

    assert not dist.is_initialized()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_world_of_one_equals_cross_entropy(reduction):
    g = gen(f"one-{reduction}")
    x = torch.randn(4, 7, 19, generator=g)
    t = torch.randint(0, 17, (4, 7), generator=g)
    t[0, :3] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=6.0, return_aux=True)
    a, b = x.clone().requires_grad_(), x[..., :17].clone().requires_grad_()
    loss, aux = vocab_parallel_cross_entropy(a, t, vocab_size=17, **kw)
    want, want_aux = crossent.cross_entropy(b, t, **kw)
    up = torch.rand(loss.shape, generator=g) + 0.5
    loss.backward(up)
    want.backward(up)
    assert torch.allclose(loss, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(a.grad[..., :17], b.grad, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(a.grad[..., 17:]) == 0
    for name in ("lse", "entropy", "ce", "z_loss", "accuracy", "weight_sum"):
        assert torch.allclose(getattr(aux, name), getattr(want_aux, name), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("kind", ["logits", "linear"])
def test_gradcheck_float64_world_of_one(kind):
    g = gen(f"gradcheck-{kind}")
    t = torch.tensor([[1, 4, -100], [0, 6, 2]])
    cw = torch.rand(7, generator=g, dtype=f64) + 0.5
    kw = dict(vocab_size=7, label_smoothing=0.2, z_loss=1e-2, softcap=3.0, logit_scale=0.7, reduction="none")
    if kind == "logits":
        x = torch.randn(2, 3, 9, generator=g, dtype=f64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: vocab_parallel_cross_entropy(x, t, weight=cw, **kw), (x,))
    else:
        h = torch.randn(2, 3, 4, generator=g, dtype=f64, requires_grad=True)
        w = torch.randn(8, 4, generator=g, dtype=f64, requires_grad=True)
        b = torch.randn(8, generator=g, dtype=f64, requires_grad=True)
        fn = lambda h, w, b: vocab_parallel_linear_cross_entropy(  # noqa: E731
            h, w, t, bias_shard=b, class_weight=cw, shift=1, **kw
        )
        assert torch.autograd.gradcheck(fn, (h, w, b))


def test_global_normalizer_world_of_one():
    a, b = torch.tensor([[3, 1, -100]]), torch.tensor([[2, -100, -100, 5]])
    assert global_normalizer([a, b]).item() == 4.0
    assert global_normalizer(a, ignore_index=1).item() == 2.0
    w = torch.arange(6, dtype=f64) / 4
    got = global_normalizer((a, b), weight=w)
    assert got.dtype == f64 and got.item() == (3 + 1 + 2 + 5) / 4
    soft = torch.softmax(torch.randn(2, 3, 6), -1)
    assert global_normalizer(soft).item() == 6.0 and global_normalizer(a).dtype == f32


def _call(fn, **overrides):
    g = gen("bad")
    args = dict(
        logits=dict(logits_shard=torch.randn(3, 8, generator=g), target=torch.tensor([0, 5, 7]), vocab_size=8),
        linear=dict(
            hidden=torch.randn(3, 4, generator=g), weight_shard=torch.randn(8, 4, generator=g),
            target=torch.tensor([0, 5, 7]), vocab_size=8,
        ),
    )[fn]  # fmt: skip
    args.update(overrides)
    if fn == "logits":
        return vocab_parallel_cross_entropy(args.pop("logits_shard"), args.pop("target"), **args)
    return vocab_parallel_linear_cross_entropy(args.pop("hidden"), args.pop("weight_shard"), args.pop("target"), **args)


BAD = [  # (function, overrides, error, words the message must contain)
    ("logits", dict(vocab_size=9), ValueError, ["vocab_size", "[1, 8]", "9"]),
    ("logits", dict(vocab_size=0), ValueError, ["vocab_size", "[1, 8]"]),
    ("logits", dict(vocab_size=7.0), TypeError, ["vocab_size", "int"]),
    ("logits", dict(vocab_size=6), IndexError, ["target 7", "(2,)", "[0, 6)"]),
    ("logits", dict(target=torch.tensor([0.5, 0.2, 0.3])), TypeError, ["target", "integer class ids"]),
    ("logits", dict(target=torch.tensor([0, 1])), ValueError, ["target", "(3,)", "(2,)"]),
    ("logits", dict(weight=torch.ones(9)), ValueError, ["weight", "(8,)", "(9,)"]),
    ("logits", dict(weight=torch.ones(8), class_weight=torch.ones(8)), ValueError, ["weight=", "class_weight="]),
    ("logits", dict(logits_shard=torch.ones(3, 8, dtype=torch.long)), TypeError, ["logits_shard", "floating"]),
    ("logits", dict(impl="triton"), ValueError, ['impl="triton"', "vocabulary-parallel"]),
    ("logits", dict(impl="cuda"), ValueError, ["impl", "'auto'"]),
    ("logits", dict(label_smoothing=1.5), ValueError, ["label_smoothing", "[0, 1]"]),
    ("logits", dict(z_loss=-1.0), ValueError, ["z_loss", ">= 0"]),
    ("logits", dict(chunk_size=0), ValueError, ["chunk_size", ">= 1"]),
    ("logits", dict(group=object()), ValueError, ["group", "init_process_group"]),
    ("linear", dict(weight_shard=torch.randn(8, 5)), ValueError, ["hidden", "D=5"]),
    ("linear", dict(bias_shard=torch.randn(9)), ValueError, ["bias_shard", "(8,)", "(9,)"]),
    ("linear", dict(weight_shard=torch.randn(8, 4, dtype=f64)), TypeError, ["weight_shard", "dtype", "float64"]),
    ("linear", dict(class_weight=torch.ones(7)), ValueError, ["class_weight", "(8,)", "(7,)"]),
    ("linear", dict(shift=-1), ValueError, ["shift", ">= 0"]),
    ("linear", dict(target=torch.tensor([0, 5, 8])), IndexError, ["target 8", "[0, 8)"]),
    ("linear", dict(vocab_size=None, weight_shard=torch.randn(0, 4)), ValueError, ["weight_shard", "V_local >= 1"]),
]


@pytest.mark.parametrize("fn, overrides, error, words", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_before_any_work(fn, overrides, error, words):
    with pytest.raises(error) as info:
        _call(fn, **overrides)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize(
    "target, kw, error, words",
    [
        ("x", {}, TypeError, ["target", "list"]),
        ([], {}, TypeError, ["target", "non-empty"]),
        ([torch.tensor([True])], {}, TypeError, ["target[0]", "bool"]),
        (torch.tensor([0, 9]), dict(weight=torch.ones(4)), IndexError, ["target 9", "[0, 4)"]),
        (torch.tensor([0, 1]), dict(weight=torch.ones(2, 2)), ValueError, ["weight", "(V,)"]),
    ],
)
def test_global_normalizer_bad_input(target, kw, error, words):
    with pytest.raises(error) as info:
        global_normalizer(target, **kw)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
