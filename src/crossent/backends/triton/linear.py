"""linear_cross_entropy on a GPU: cuBLAS products plus Triton row kernels, the Triton backend's
``linear_forward`` and ``linear_backward`` (:class:`crossent.core.autograd.Backend`).

``cross_entropy(hidden @ weight.T + bias)`` without ever holding the (N, V) logits, in three
layers; the custom ops, their fakes and the autograd formula are the core's
(:mod:`crossent.core.autograd`), which calls the third:

1. the ``@triton.jit`` kernels. A token chunk (r, V) of logits is exactly a cross_entropy
   problem, so the token schedule launches ``cross_entropy.forward_kernel`` on it (the loss,
   ``(m, log S)``, ``return_aux``'s columns and, when wanted, the gradient written over the
   logits in place). A vocabulary chunk (N, w) needs two kernels of its own, built from the same
   ``@triton.jit`` pieces of :mod:`.common`: :func:`block_stats_kernel` merges the block into every
   token's running statistics (DESIGN.md §1's online ``(m, S)`` merge, with the smoothing sum, the
   target's score, the entropy sum and the argmax), and :func:`block_gradient_kernel` writes
   ``g·∂ℓ/∂x`` of any block — a whole row being the block ``col0 = 0, w = V`` — from the saved pair;
2. what each chunk of the core's two loops (``core.chunks.token_chunks`` / ``column_chunks``,
   which form the logits of a chunk by one cuBLAS product) launches: :func:`_token_pass`,
   :func:`_vocab_stats_pass`, :func:`_vocab_gradient_pass`;
3. the functions the core calls: :func:`forward` (the gradients formed when
   ``config.grads_in_forward``) and :func:`backward` (recomputed from the saved pair).

Products and dtypes (DESIGN.md §4). Every product runs on cuBLAS in the input dtype; float32
accumulation is cuBLAS's own inside one product, and across chunks a float32 buffer:

* logits: ``addmm(b, h, Wᵀ)`` in the input dtype (as ``F.linear`` rounds them), into one reused
  chunk buffer; the row kernels convert to float32 right after loading;
* ``∂ℓ/∂z`` of a chunk: written by the kernel over that buffer, in the input dtype, at *unit
  scale* (the per-token derivative, ``g = 1``): the "mean" factor ``1/Σw_y`` is applied to the
  float32 results instead, so a float16 chunk does not flush ``softmax_j / (N·V)``-sized values
  to zero;
* products whose result is accumulated over chunks (``∂W`` in "token", ``∂hidden`` in "vocab"):
  ``torch.addmm(acc, a, b, torch.float32, out=acc)`` — 16-bit operands, float32 accumulator, one
  cuBLAS call (PyTorch ≥ 2.8 on CUDA; else float32 operands a chunk at a time, see
  :func:`_addmm_f32_`). The classifier gradient of "token" is therefore exact to float32 over all
  tokens (a float32 accumulator: 2×|W| for a 16-bit weight);
* products written once (``∂hidden`` rows in "token", ``∂W`` rows in "vocab"): a float32-output
  product (``torch.mm(a, b, out_dtype=torch.float32)``), times the reduction's factor, rounded
  once into the gradient's own dtype; without the factor ("sum", or a recomputed gradient that
  already carries it) straight into the gradient with ``torch.mm(out=...)``.

On the CPU (the Triton interpreter, which the tests use) the same code runs; the products are
PyTorch's CPU ones in the input dtype, and the two float32-output forms are emulated by float32
operands (a 16-bit product is exact in float32, so only the summation order differs).

Where the gradients are computed: during the forward whenever they are needed and the loss is
reduced ("mean", "sum"), as the PyTorch backend does — on a GPU too, since recomputing in backward
would cost a fourth (token) or fifth (vocab) product, while the upstream gradient is then applied
by scaling (N + V)·D values. With ``reduction="none"`` backward recomputes them with the per-token
upstream gradient folded into ``∂ℓ/∂z``.

Ignored tokens: no host sync (no ``nonzero()``), so they go through the products; the kernels read
none of their logits and write zero gradient rows, so they add nothing to ``∂W``. Out-of-range
target ids give a NaN loss and gradient row for that token and are never used as an address.
Float64 inputs never reach this backend (a Triton kernel's float arguments are float32).

A fused tile kernel that never writes logits to memory is not provided: the cuBLAS + row-kernel
design is provably correct here, and whether fusion pays can only be measured on a GPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...core.chunks import Shard, column_chunks, item_size, token_chunks
from ...core.config import OpConfig
from ...core.rows import AUX_COLUMNS, RowSums, finish_rows, reduce, reduction_scale, target_terms
from ...options import GEMM_TILE_ROWS, TRITON_MAX_TOKEN_ROWS, rows_per_chunk
from . import common
from .cross_entropy import block_size, forward_kernel

#: Columns of the running state of the "vocab" schedule: m, S, Σe(z-m), (ε/V)Σw(z-m)/2, (ε/V)Σw, z_y.
STATE_COLUMNS = 6


# --------------------------------------------------------------------------------------------
# 1. Kernels (the token schedule uses cross_entropy.forward_kernel as it is)
# --------------------------------------------------------------------------------------------


@triton.jit
def block_stats_kernel(
    x_ptr, x_rs, x_cs, t_ptr, t_rs, w_ptr, st_ptr, best_ptr, col0, width, V, ignore_index, one_minus_eps,
    eps_over_v, c, k, s, BLOCK_V: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_AUX: tl.constexpr,
    X_UNIT: tl.constexpr, LIBDEVICE: tl.constexpr,
):  # fmt: skip
    """One program per token: merge the columns ``[col0, col0 + width)`` (the block ``x``) into
    the token's running state ``st`` (STATE_COLUMNS float32 values) and argmax ``best``.

    The state is relative to the running maximum ``m`` (its base: ``m``, or 0 while it is
    -inf) and re-based exactly when ``m`` grows, by the merge of ``cross_entropy.forward_kernel``
    (``common.merge_scores``, ``common.merge_smoothing``); an ignored token reads nothing unless
    its lse and entropy are reported (``WANT_AUX``).
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_rs
    lanes = tl.arange(0, BLOCK_V)
    y, keep, _w_y = common.target_of_row(t_ptr + row * t_rs, w_ptr, V, ignore_index, False, HAS_WEIGHT)
    st = st_ptr + row * 6
    m = tl.load(st)
    sum_e = tl.load(st + 1)  # S = Σ exp(z_j - base)
    sum_ez = tl.load(st + 2)  # Σ exp(z_j - base)·(z_j - base)   (entropy)
    sum_wz = tl.load(st + 3)  # (ε/V)·Σ w_j (z_j - base)/2, in halves (smoothing)
    sum_w = tl.load(st + 4)  # (ε/V)·Σ w_j over the columns seen so far
    z_y = tl.load(st + 5)  # the target's score, once its block was seen
    base = tl.where(m == common.NEG_INF, 0.0, m)
    best_i = tl.full([], 0, tl.int32)  # neither read nor written without WANT_AUX
    if WANT_AUX:
        best_i = tl.load(best_ptr + row)
        n_cols = width
    else:
        n_cols = tl.where(keep, width, 0)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + lanes
        mask = cols < width
        z, _zs, _shift, m_new, base_new, sum_e, sum_ez, best_i = common.merge_scores(
            x_row, x_cs, cols, mask, col0 + start, m, base, sum_e, sum_ez, best_i, k, s,
            HAS_SCALE, HAS_SOFTCAP, WANT_AUX, X_UNIT, LIBDEVICE,
        )  # fmt: skip
        if HAS_SMOOTH:
            sum_wz, sum_w = common.merge_smoothing(
                w_ptr + col0, cols, mask, z, base, base_new, sum_wz, sum_w, eps_over_v, HAS_WEIGHT
            )
        m = m_new
        base = base_new
    # the target's score, when it lies in this block (an out-of-range id reads class 0)
    inside = keep & (y >= col0) & (y < col0 + width)
    local = tl.where(inside, y - col0, 0)
    x_y = tl.load(x_row + local * x_cs, mask=inside, other=0.0)
    zy_new, _ty = common.scores(x_y, s, k, HAS_SCALE, HAS_SOFTCAP, LIBDEVICE)
    z_y = tl.where(inside, zy_new, z_y)
    tl.store(st, m)
    tl.store(st + 1, sum_e)
    tl.store(st + 2, sum_ez)
    tl.store(st + 3, sum_wz)
    tl.store(st + 4, sum_w)
    tl.store(st + 5, z_y)
    if WANT_AUX:
        tl.store(best_ptr + row, best_i)


@triton.jit
def block_gradient_kernel(
    x_ptr, x_rs, x_cs, gx_ptr, gx_rs, gx_cs, t_ptr, t_rs, w_ptr, w_sum_ptr, m_ptr, log_s_ptr, g_ptr, g_stride,
    col0, width, V, ignore_index, one_minus_eps, eps_over_v, c, k, s, BLOCK_V: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, X_UNIT: tl.constexpr, G_UNIT: tl.constexpr, LIBDEVICE: tl.constexpr,
):  # fmt: skip
    """One program per token: ``g·∂ℓ/∂x`` of the columns ``[col0, col0 + width)`` of a row of V
    classes (hard target), from the saved ``(m, log S)``; ``gx`` may be ``x`` (in place).

    ``∂ℓ/∂z_j = (softmax_j - [j=y])·(1-ε)w_y + softmax_j·((ε/V)Σw + 2c·w_y·lse) - (ε/V)·w_j``:
    ``common.gradient_row`` applied to the block, with the target and the class weights shifted
    by ``col0``.
    """
    row = tl.program_id(0).to(tl.int64)
    t_row = t_ptr + row * t_rs
    y, keep, w_y = common.target_of_row(t_row, w_ptr, V, ignore_index, False, HAS_WEIGHT)
    base, log_s, lse, g = common.saved_pair(m_ptr, log_s_ptr, g_ptr, g_stride, row)
    coef, rest = common.hard_coefficients(
        w_y, lse, w_sum_ptr, V, one_minus_eps, eps_over_v, c, HAS_WEIGHT, HAS_SMOOTH, HAS_ZLOSS
    )
    common.gradient_row(
        x_ptr + row * x_rs, x_cs, gx_ptr + row * gx_rs, gx_cs, t_row, 1, w_ptr + col0, width, y - col0, keep,
        base, log_s, g, coef, rest, one_minus_eps, eps_over_v, k, s, BLOCK_V, False, HAS_WEIGHT, HAS_SMOOTH,
        HAS_SCALE, HAS_SOFTCAP, X_UNIT, True, G_UNIT, LIBDEVICE,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# 2. Products and the two loops
# --------------------------------------------------------------------------------------------


@functools.cache
def mixed_products(device_type: str) -> bool:
    """Whether ``addmm`` / ``mm`` take 16-bit operands with a float32 result on this device
    (CUDA, PyTorch >= 2.8): probed once per process by a tiny call (no host sync)."""
    if device_type != "cuda":
        return False
    try:
        a = torch.zeros((2, 2), dtype=torch.bfloat16, device=device_type)
        acc = torch.zeros((2, 2), dtype=torch.float32, device=device_type)
        torch.addmm(acc, a, a, torch.float32, out=acc)
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` accumulated and returned in float32, whatever the operands' dtype."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if mixed_products(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` into a float32 accumulator: one cuBLAS call with 16-bit operands where
    the device has it, else float32 operands (converted a chunk at a time)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif mixed_products(a.device.type):
        torch.addmm(acc, a, b, acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _rows_into(out: Tensor, a: Tensor, b: Tensor, scale: Tensor | None) -> None:
    """``out = scale·(a @ b)`` rounded once into ``out``'s dtype (no scale: straight into it)."""
    if scale is None:
        torch.mm(a, b, out=out)
    elif out.dtype == torch.float32:
        torch.mm(a, b, out=out).mul_(scale)
    else:
        torch.mul(_mm_f32(a, b), scale, out=out)


class _Problem:
    """One call's flattened inputs and what every pass shares (no host sync anywhere)."""

    def __init__(self, hidden, weight, bias, target, class_weight, config: OpConfig):
        self.h, self.weight, self.bias = hidden, weight, bias
        self.N, self.D = hidden.shape
        self.V = weight.shape[0]
        self.n, self.h_all, self.shard = self.N, hidden, Shard.whole(self.V)  # every token goes through
        self.dtype, self.device = hidden.dtype, hidden.device
        self.reduction, self.opts = config.reduction, config.rows
        self.t = common.hard_rows(target)
        self.one = torch.ones((), dtype=torch.float32, device=self.device)
        self.cw, self.cw_sum, self.has_weight = common.class_weights(class_weight, self.one)
        cw = self.cw if self.has_weight else None
        self.terms = target_terms(self.t, cw, self.V, config.ignore_index, torch.float32)
        self.denominator = self.terms.denominator
        self.w_sum = self.cw_sum if self.has_weight else torch.full((), float(self.V), device=self.device)
        self.scalars, self.flags = common.scalars(self.V, config)

    def h_rows(self, lo: int, hi: int) -> Tensor:
        return self.h[lo:hi]

    def weight_rows(self, lo: int, hi: int) -> Tensor:
        return self.weight[lo:hi]

    def buffer(self, numel: int) -> Tensor:
        """A reusable flat buffer for chunks of logits, in the input dtype (as cuBLAS writes them)."""
        return torch.empty(numel, dtype=self.dtype, device=self.device)

    def logits(self, h: Tensor, w: Tensor, lo: int, hi: int, out: Tensor) -> Tensor:
        """``out = h @ wᵀ + b[lo:hi]`` in the input dtype (cuBLAS), ``w`` the rows ``[lo, hi)``."""
        if self.bias is not None:
            return torch.addmm(self.bias[lo:hi], h, w.T, out=out)
        return torch.mm(h, w.T, out=out)

    def forward_scale(self) -> Tensor | None:
        """The factor that turns unit-scale gradients into the reduced loss's (None: 1)."""
        if self.reduction == "sum":
            return None
        return reduction_scale(self.reduction, self.denominator)


class _Gradients:
    """Where the gradients go. A product written once per chunk goes straight into a gradient of
    the input's dtype, scaled as it is written; one accumulated over chunks (and the bias
    gradient) goes into a float32 buffer at unit scale, scaled and rounded once at the end
    (:meth:`outputs`). ``scale`` is the reduction's factor (None: 1)."""

    def __init__(self, p: _Problem, needs: tuple[bool, bool, bool], schedule: str, scale):
        f32, dev = torch.float32, p.device
        need_h, need_w, need_b = needs
        self.p, self.scale = p, scale
        token = schedule == "token"
        self.h = torch.empty((p.N, p.D), dtype=p.dtype if token else f32, device=dev) if need_h else None
        self.w = torch.empty((p.V, p.D), dtype=f32 if token else p.dtype, device=dev) if need_w else None
        if self.h is not None and not token:
            self.h.zero_()
        if self.w is not None and token:
            self.w.zero_()
        self.b = torch.zeros(p.V, dtype=f32, device=dev) if need_b else None
        self.accumulated = {"h": not token, "w": token, "b": True}

    def token_chunk(self, dz: Tensor, h: Tensor, lo: int, hi: int) -> None:
        """The gradients of a token chunk from its ``∂ℓ/∂x`` rows ``dz`` (r, V)."""
        if self.h is not None:
            _rows_into(self.h[lo:hi], dz, self.p.weight, self.scale)
        if self.w is not None:
            _addmm_f32_(self.w, dz.T, h)
        if self.b is not None:
            self.b += dz.sum(0, dtype=torch.float32)

    def vocab_chunk(self, dz: Tensor, lo: int, hi: int) -> None:
        """The gradients of a vocabulary chunk from its ``∂ℓ/∂x`` columns ``dz`` (N, w)."""
        p = self.p
        if self.w is not None:
            _rows_into(self.w[lo:hi], dz.T, p.h, self.scale)
        if self.b is not None:
            torch.sum(dz, 0, dtype=torch.float32, out=self.b[lo:hi])
        if self.h is not None:
            _addmm_f32_(self.h, dz, p.weight[lo:hi])

    def outputs(self, bias_dtype):
        """(grad_h, grad_w, grad_b) in their dtypes; distinct empty placeholders for the ones not
        wanted (outputs of a custom op may not alias)."""
        p = self.p

        def finish(name: str, dtype) -> Tensor:
            t = getattr(self, name)
            if t is None:
                return torch.empty(0, dtype=dtype, device=p.device)
            if not self.accumulated[name]:
                return t  # written once per chunk, scaled already
            if self.scale is None:
                return t.to(dtype)
            if dtype == t.dtype:
                return t.mul_(self.scale)
            return torch.mul(t, self.scale, out=torch.empty(t.shape, dtype=dtype, device=p.device))

        return finish("h", p.dtype), finish("w", p.dtype), finish("b", bias_dtype)


def _token_rows(p: _Problem, chunk_size: int) -> int:
    """Tokens per chunk (``chunk_size``, 0: automatic): the (r, V) logits buffer (input dtype) and
    the float32 rows of one ``∂hidden`` product fit the memory budget."""
    if chunk_size > 0:
        return chunk_size
    return rows_per_chunk(p.V * item_size(p.dtype) + 4 * p.D, cap=TRITON_MAX_TOKEN_ROWS, multiple=GEMM_TILE_ROWS)


def _vocab_cols(p: _Problem, chunk_size: int) -> int:
    """Vocabulary rows per chunk (``chunk_size``, 0: automatic): the (N, w) logits buffer and the
    float32 rows of one ``∂W`` product fit the memory budget."""
    if chunk_size > 0:
        return chunk_size
    return rows_per_chunk(max(1, p.N) * item_size(p.dtype) + 4 * p.D, multiple=GEMM_TILE_ROWS)


def _launch_gradient(p: _Problem, z: Tensor, lo: int, hi: int, col0: int, m, log_s, g, block: int) -> None:
    """``g·∂ℓ/∂x`` of the block ``z`` (tokens ``[lo, hi)``, columns from ``col0``), over ``z``."""
    r, width = z.shape
    per_row = g.dim() != 0
    block_gradient_kernel[(r,)](
        z, z.stride(0), z.stride(1), z, z.stride(0), z.stride(1), p.t[lo:], p.t.stride(0), p.cw, p.cw_sum, m[lo:],
        log_s[lo:], g[lo:] if per_row else g, 1 if per_row else 0, col0, width, **p.scalars, BLOCK_V=block,
        HAS_WEIGHT=p.has_weight, X_UNIT=True, G_UNIT=True, **p.flags, num_warps=common.num_warps(block),
    )  # fmt: skip


def _token_pass(p: _Problem, rows: int, *, grads=None, want_aux=False, m=None, log_s=None, g=None):
    """The "token" loop: per chunk of r tokens one product for the logits, the row kernel, and
    with ``grads`` the two gradient products.

    Forward (``m`` None): ``cross_entropy.forward_kernel`` gives the loss, ``(m, log S)``, the
    aux columns and, with ``grads``, the unit-scale ``∂ℓ/∂x`` over the logits; returns
    ``(token loss, m, log_s, aux)``. Backward: ``∂ℓ/∂x`` times ``g`` from the saved pair.
    """
    f32, N, V, dev = torch.float32, p.N, p.V, p.device
    forward = m is None
    if forward:
        loss = torch.empty(N, dtype=f32, device=dev)
        m = torch.empty(N, dtype=f32, device=dev)
        log_s = torch.empty(N, dtype=f32, device=dev)
        aux = torch.empty((N if want_aux else 0, AUX_COLUMNS), dtype=f32, device=dev)
    block = block_size(V)
    for lo, hi, h, z, _w in token_chunks(p, rows):
        if not forward:
            _launch_gradient(p, z, lo, hi, 0, m, log_s, g, block)
        else:
            # unit scale (p.one): the reduction's factor is applied to the float32 results
            forward_kernel[(hi - lo,)](
                z, z.stride(0), z.stride(1), p.t[lo:], p.t.stride(0), 1, p.cw, p.cw_sum, loss[lo:], m[lo:],
                log_s[lo:],
                aux[lo:] if want_aux else m,  # not written without WANT_AUX
                p.one, z, z.stride(0), z.stride(1), **p.scalars,
                BLOCK_V=block, SOFT=False, HAS_WEIGHT=p.has_weight, WANT_AUX=want_aux,
                COMPUTE_GRAD=grads is not None, X_UNIT=True, T_UNIT=True, G_UNIT=True, **p.flags,
                num_warps=common.num_warps(block),
            )  # fmt: skip
        if grads is not None:
            grads.token_chunk(z, h, lo, hi)
    if forward:
        return loss, m, log_s, aux
    return None


def _vocab_stats_pass(p: _Problem, cols: int, want_aux: bool):
    """The first "vocab" pass: per vocabulary chunk one product over all tokens, merged into
    every token's running state by :func:`block_stats_kernel`; then the loss of every token
    from its state (``rows.finish_rows``: the one loss formula of both backends)."""
    f32, N, V, dev = torch.float32, p.N, p.V, p.device
    state = torch.zeros((N, STATE_COLUMNS), dtype=f32, device=dev)
    state[:, 0] = float("-inf")
    best = torch.zeros(N if want_aux else 0, dtype=torch.int32, device=dev)
    block = block_size(max(1, min(cols, V)))
    for lo, hi, z, _w in column_chunks(p, cols):
        if N == 0:
            continue
        block_stats_kernel[(N,)](
            z, z.stride(0), z.stride(1), p.t, p.t.stride(0), p.cw, state,
            best if want_aux else state,  # not touched without WANT_AUX
            lo, hi - lo, **p.scalars, BLOCK_V=block, HAS_WEIGHT=p.has_weight, WANT_AUX=want_aux, X_UNIT=True,
            **p.flags, num_warps=common.num_warps(block),
        )  # fmt: skip
    return _finish_state(p, state, best, want_aux)


def _finish_state(p: _Problem, state: Tensor, best: Tensor, want_aux: bool):
    """(token loss, m, log_s, aux) from the merged state; ``m`` and ``log S`` are 0 for ignored
    tokens whose logits were not read (as ``cross_entropy.forward_kernel`` writes them)."""
    t, opts = p.terms, p.opts
    m, s = state[:, 0], state[:, 1]
    log_s = s.log()
    base = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    sums = RowSums(
        m=m,
        log_s=log_s,
        z_y=state[:, 5] - base,
        wz=2.0 * state[:, 3] if opts.label_smoothing != 0.0 else None,  # kept in halves
    )
    if want_aux:
        sums.p_dot_z = state[:, 2] / s
        sums.hit = (best.long() == t.y).to(torch.float32)
    stats = finish_rows(sums, opts, p.V, w_y=t.w_y, keep=t.keep, weight_sum=p.w_sum, want_aux=want_aux)
    aux = stats.aux_columns()
    if not want_aux:
        zero = torch.zeros_like(m)
        m, log_s = torch.where(t.keep, m, zero), torch.where(t.keep, log_s, zero)
    return stats.loss, m.contiguous(), log_s.contiguous(), aux


def _vocab_gradient_pass(p: _Problem, cols: int, m: Tensor, log_s: Tensor, g: Tensor, grads: _Gradients) -> None:
    """The second "vocab" pass: per vocabulary chunk the logits again (one product), their
    ``g·∂ℓ/∂x`` from the saved pair (:func:`block_gradient_kernel`), that chunk's rows of
    ``∂W`` and ``∂b`` (written once) and its share of ``∂hidden`` (accumulated in float32)."""
    N, V = p.N, p.V
    block = block_size(max(1, min(cols, V)))
    for lo, hi, z, _w in column_chunks(p, cols):
        if N:
            _launch_gradient(p, z, 0, N, lo, m, log_s, g, block)
        grads.vocab_chunk(z, lo, hi)


# --------------------------------------------------------------------------------------------
# 3. The functions the core calls (registered by the package)
# --------------------------------------------------------------------------------------------


def forward(hidden, weight, bias, target, class_weight, config: OpConfig):
    """(loss, m, log_s, denominator, grad_h, grad_w, grad_b, aux) of the flattened call (hidden
    (N, D)); the gradients are formed when ``config.grads_in_forward`` (three distinct empty
    placeholders otherwise: outputs of a custom op may not alias)."""
    p = _Problem(hidden, weight, bias, target, class_weight, config)
    grads = _Gradients(p, config.needs, config.schedule, p.forward_scale()) if config.grads_in_forward else None
    if config.schedule == "token":
        rows = _token_rows(p, config.chunk_size)
        loss, m, log_s, aux = _token_pass(p, rows, grads=grads, want_aux=config.want_aux)
    else:
        cols = _vocab_cols(p, config.chunk_size)
        loss, m, log_s, aux = _vocab_stats_pass(p, cols, config.want_aux)
        if grads is not None:
            _vocab_gradient_pass(p, cols, m, log_s, p.one, grads)
    dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else weight.dtype)
    if grads is not None:
        grad_h, grad_w, grad_b = grads.outputs(dtypes[2])
    else:
        grad_h, grad_w, grad_b = (torch.empty(0, dtype=d, device=hidden.device) for d in dtypes)
    out = reduce(loss, config.reduction, p.denominator)
    return out, m, log_s, p.denominator, grad_h, grad_w, grad_b, aux


def backward(grad_loss, hidden, weight, bias, target, class_weight, m, log_s, config: OpConfig):
    """(grad_h, grad_w, grad_b) recomputed from the saved pair, times the upstream gradient
    (empty placeholders for the ones ``config.needs`` does not ask for)."""
    p = _Problem(hidden, weight, bias, target, class_weight, config)
    grads = _Gradients(p, config.needs, config.schedule, None)
    g = common.row_factors(p.reduction, p.denominator, grad_loss)
    m, log_s = m.contiguous(), log_s.contiguous()
    if config.schedule == "token":
        _token_pass(p, _token_rows(p, config.chunk_size), grads=grads, m=m, log_s=log_s, g=g)
    else:
        _vocab_gradient_pass(p, _vocab_cols(p, config.chunk_size), m, log_s, g, grads)
    return grads.outputs(bias.dtype if bias is not None else weight.dtype)
