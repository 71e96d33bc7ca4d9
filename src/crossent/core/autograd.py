"""The one autograd / ``torch.library`` layer of crossent, for every loss and every backend.

Each op is registered once as a custom op (so ``torch.compile(fullgraph=True)`` traces through it
without a graph break), with its fake implementation and its autograd formula. The op does not
compute anything itself: it rebuilds the call's :class:`~crossent.core.config.OpConfig` and hands
the tensors to the kernels of the backend the config names (:class:`Backend`, registered by
``crossent.backends``). Adding a backend adds kernels, never another copy of this layer.

Where the gradient is formed. A backend may compute ``∂loss/∂input`` during the forward, while the
exponentials are at hand (the PyTorch backend always does in eager mode: on a CPU that is faster
than recomputing, benchmarks/RESULTS.md). That gradient is not saved: it is handed to the first backward through a box,
scaled there in place by the upstream gradient and let go of, so autograd can take it as ``.grad``
without a copy. A second backward through a retained graph runs the forward's own gradient path
again, so that repeated backward passes agree bit for bit. Under ``torch.compile`` the traced graph
stays functional: the logits' gradient is recomputed in backward from the saved ``(m, log S)`` pair,
and the linear gradients are saved and scaled out of place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from .config import OpConfig
from .rows import AUX_COLUMNS, accumulation_dtype


@dataclass(frozen=True)
class Backend:
    """The kernels one backend supplies to the core (all inputs validated and flattened already).

    ``cross_entropy_forward(logits, target, weight, config, compute_grad)`` returns
    ``(loss, m, log_s, denominator, grad or empty, aux or empty)``;
    ``cross_entropy_backward_into(out, grad_loss, logits, target, weight, m, log_s, denominator,
    config)`` writes ``∂loss/∂logits · grad_loss`` into ``out`` (which may be ``logits``);
    ``linear_forward(hidden, weight, bias, target, class_weight, config)`` returns
    ``(loss, m, log_s, denominator, grad_hidden, grad_weight, grad_bias, aux)``, the gradients
    formed when ``config.grads_in_forward``; ``linear_backward(grad_loss, hidden, weight, bias,
    target, class_weight, m, log_s, config)`` recomputes them; ``grad_in_forward(device)`` says
    whether eager mode forms the logits' gradient during the forward.
    """

    name: str
    cross_entropy_forward: Callable
    cross_entropy_backward_into: Callable
    linear_forward: Callable
    linear_backward: Callable
    grad_in_forward: Callable[[torch.device], bool]


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` reachable by its name from the custom ops."""
    _BACKENDS[backend.name] = backend
    return backend


def backend_named(name: str) -> Backend:
    return _BACKENDS[name]


def scale_saved_gradient(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """``grad *= grad_loss`` in place: a scalar, or one value per row of ``grad``.

    Skipped when a scalar upstream gradient is exactly 1 on a CPU tensor (the usual
    ``loss.backward()`` then makes no pass at all); on other devices it is applied without looking
    (no host sync).
    """
    if grad_loss.dim() == 0:
        if not (grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):
            grad.mul_(grad_loss)
    else:
        grad.view(-1, grad.shape[-1]).mul_(grad_loss.reshape(-1, 1))
    return grad


# --------------------------------------------------------------------------------------------
# cross_entropy: forward (gradient optional), backward (fresh or in place)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("crossent::cross_entropy", mutates_args=())
def cross_entropy_forward(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    floats: list[float],
    ints: list[int],
    words: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, m, log_s, denominator, grad or empty, aux (N, 4) or empty)."""
    config = OpConfig.unpack(floats, ints, words)
    return backend_named(config.backend).cross_entropy_forward(logits, target, weight, config, compute_grad)


@cross_entropy_forward.register_fake
def _(logits, target, weight, floats, ints, words, compute_grad):
    config = OpConfig.unpack(floats, ints, words)
    acc = accumulation_dtype(logits.dtype)
    lead = logits.shape[:-1]
    N = math.prod(lead)
    loss = logits.new_empty(lead if config.reduction == "none" else (), dtype=acc)
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    aux = logits.new_empty((N if config.want_aux else 0, AUX_COLUMNS), dtype=acc)
    m, log_s = logits.new_empty((N,), dtype=acc), logits.new_empty((N,), dtype=acc)
    return loss, m, log_s, logits.new_empty((), dtype=acc), grad, aux


def _backward_into(out, grad_loss, logits, target, weight, m, log_s, denominator, floats, ints, words) -> None:
    config = OpConfig.unpack(floats, ints, words)
    backend = backend_named(config.backend)
    backend.cross_entropy_backward_into(out, grad_loss, logits, target, weight, m, log_s, denominator, config)


@torch.library.custom_op("crossent::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    m: Tensor,
    log_s: Tensor,
    denominator: Tensor,
    floats: list[float],
    ints: list[int],
    words: str,
) -> Tensor:
    """A fresh ``∂loss/∂logits`` (logits' shape and dtype, contiguous), from the saved pair."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(out, grad_loss, logits, target, weight, m, log_s, denominator, floats, ints, words)
    return out


@cross_entropy_backward.register_fake
def _(grad_loss, logits, *rest):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _cross_entropy_setup_context(ctx, inputs, output):
    logits, target, weight, floats, ints, words, compute_grad = inputs
    loss, m, log_s, denominator, grad, aux = output
    ctx.packed = (floats, ints, words)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(m, log_s, denominator, grad, aux)
    ctx.grad_box = [grad] if compute_grad else []  # handed over once (see the module docstring)
    ctx.grad_in_forward = compute_grad
    ctx.save_for_backward(logits, target, weight, m, log_s, denominator)


def _cross_entropy_backward(ctx, grad_loss, *unused):
    none = (None,) * 6
    if grad_loss is None:
        return (None, *none)
    if ctx.grad_box:
        return (scale_saved_gradient(ctx.grad_box.pop(), grad_loss), *none)
    logits, target, weight, m, log_s, denominator = ctx.saved_tensors
    if ctx.grad_in_forward:  # a second eager backward: the forward's gradient path again
        grad = cross_entropy_forward(logits, target, weight, *ctx.packed, True)[4]
        return (scale_saved_gradient(grad, grad_loss), *none)
    grad = cross_entropy_backward(grad_loss, logits, target, weight, m, log_s, denominator, *ctx.packed)
    return (grad, *none)


cross_entropy_forward.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup_context)


class _InplaceBackward(torch.autograd.Function):
    """Eager ``inplace_backward=True``: forward as the op; backward overwrites the logits, each
    element read before it is written, chunk by chunk (O(chunk) extra memory).

    A plain autograd.Function (not the op's registration): writing into a saved input is an
    eager-mode contract, so no custom op is needed; under ``torch.compile`` the functional path
    is used.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, packed):
        outputs = cross_entropy_forward(logits, target, weight, *packed, False)
        loss, m, log_s, denominator, grad, aux = outputs
        ctx.save_for_backward(logits, target, weight, m, log_s, denominator)
        ctx.packed = packed
        ctx.mark_non_differentiable(m, log_s, denominator, grad, aux)
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        logits, target, weight, m, log_s, denominator = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None
        _backward_into(logits, grad_loss, logits, target, weight, m, log_s, denominator, *ctx.packed)
        return logits, None, None, None


def cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None, config: OpConfig, inplace_backward: bool):
    """Run cross_entropy with autograd; returns (loss, m, log_s, denominator, aux)."""
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    eager = not torch.compiler.is_compiling()
    packed = config.pack()
    if inplace_backward and needs_grad and eager:
        outputs = _InplaceBackward.apply(logits, target, weight, packed)
    else:
        compute_grad = needs_grad and eager and backend_named(config.backend).grad_in_forward(logits.device)
        outputs = cross_entropy_forward(logits, target, weight, *packed, compute_grad)
    loss, m, log_s, denominator, _, aux = outputs
    return loss, m, log_s, denominator, aux


# --------------------------------------------------------------------------------------------
# linear_cross_entropy: forward (gradients formed when needed), backward (recomputed)
# --------------------------------------------------------------------------------------------


def _grad_placeholders(hidden: Tensor, weight: Tensor, bias: Tensor | None, config: OpConfig, with_grads: bool):
    """Gradient outputs of the linear ops as fakes: the input's shape where formed, else empty."""
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    shapes = []
    dtypes = (hidden.dtype, weight.dtype, bias_dtype)
    for t, need, dtype in zip((hidden, weight, bias), config.needs, dtypes, strict=True):
        formed = with_grads and need and t is not None
        shapes.append(t.new_empty(t.shape) if formed else hidden.new_empty((0,), dtype=dtype))
    return tuple(shapes)


@torch.library.custom_op("crossent::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    floats: list[float],
    ints: list[int],
    words: str,
    eager: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, m, log_s, denominator, grad_hidden, grad_weight, grad_bias, aux); hidden is (N, D).

    ``eager`` only tells the autograd registration how to keep the gradients.
    """
    config = OpConfig.unpack(floats, ints, words)
    return backend_named(config.backend).linear_forward(hidden, weight, bias, target, class_weight, config)


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, bias, target, class_weight, floats, ints, words, eager):
    config = OpConfig.unpack(floats, ints, words)
    acc = accumulation_dtype(weight.dtype)
    N = hidden.shape[0]
    loss = hidden.new_empty((N,) if config.reduction == "none" else (), dtype=acc)
    grads = _grad_placeholders(hidden, weight, bias, config, config.grads_in_forward)
    aux = hidden.new_empty((N if config.want_aux else 0, AUX_COLUMNS), dtype=acc)
    vec = hidden.new_empty((N,), dtype=acc)
    return loss, vec, hidden.new_empty((N,), dtype=acc), hidden.new_empty((), dtype=acc), *grads, aux


@torch.library.custom_op("crossent::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    m: Tensor,
    log_s: Tensor,
    floats: list[float],
    ints: list[int],
    words: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients recomputed from the saved pair, times the upstream gradient."""
    config = OpConfig.unpack(floats, ints, words)
    backend = backend_named(config.backend)
    return backend.linear_backward(grad_loss, hidden, weight, bias, target, class_weight, m, log_s, config)


@linear_cross_entropy_backward.register_fake
def _(grad_loss, hidden, weight, bias, target, class_weight, m, log_s, floats, ints, words):
    return _grad_placeholders(hidden, weight, bias, OpConfig.unpack(floats, ints, words), True)


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, class_weight, floats, ints, words, eager = inputs
    loss, m, log_s, denominator, grad_h, grad_w, grad_b, aux = output
    config = OpConfig.unpack(floats, ints, words)
    ctx.packed = (floats, ints, words)
    ctx.needs = config.needs
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(m, log_s, denominator, aux)
    in_forward = config.grads_in_forward
    ctx.grad_box = [grad_h, grad_w, grad_b] if in_forward and eager else []
    ctx.eager_in_forward = in_forward and eager
    ctx.grads_saved = in_forward and not eager  # compiled: saved, scaled out of place
    saved_grads = (grad_h, grad_w, grad_b) if ctx.grads_saved else ()
    ctx.save_for_backward(hidden, weight, bias, target, class_weight, m, log_s, *saved_grads)


def _linear_backward(ctx, grad_loss, *unused):
    none = (None,) * 6
    if grad_loss is None:
        return (None, None, None, *none)
    if ctx.grad_box:
        grads, ctx.grad_box = ctx.grad_box, []
        grads = [scale_saved_gradient(g, grad_loss) if need else None for g, need in zip(grads, ctx.needs, strict=True)]
    else:
        saved = ctx.saved_tensors
        if ctx.grads_saved:
            grads = [g * grad_loss if need else None for g, need in zip(saved[7:], ctx.needs, strict=True)]
        elif ctx.eager_in_forward:  # a second eager backward: the forward's gradient path again
            grads = linear_cross_entropy_forward(*saved[:5], *ctx.packed, True)[4:7]
            grads = [
                scale_saved_gradient(g, grad_loss) if need else None for g, need in zip(grads, ctx.needs, strict=True)
            ]
        else:
            grads = list(linear_cross_entropy_backward(grad_loss, *saved[:7], *ctx.packed))
    grad_h, grad_w, grad_b = (grad if need else None for grad, need in zip(grads, ctx.needs, strict=True))
    return (grad_h, grad_w, grad_b if ctx.has_bias else None, *none)


linear_cross_entropy_forward.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear_cross_entropy(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    config: OpConfig,
):
    """Run linear_cross_entropy with autograd on flattened, validated inputs; returns
    (loss, m, log_s, denominator, aux). ``config.needs`` is filled in here."""
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden2d.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    packed = replace(config, needs=needs).pack()
    outputs = linear_cross_entropy_forward(
        hidden2d, weight, bias, target, class_weight, *packed, not torch.compiler.is_compiling()
    )
    loss, m, log_s, denominator, *_, aux = outputs
    return loss, m, log_s, denominator, aux
