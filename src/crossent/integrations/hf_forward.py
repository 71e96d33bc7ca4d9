"""The patched training forward of :mod:`crossent.transformers`.

In a training step with labels, the model's own forward runs with two stand-ins: for its
classifier (:class:`_Capture` keeps the decoder's final hidden states and returns empty logits)
and for ``model.loss_function`` (:class:`_LossCall` computes :func:`crossent.linear_cross_entropy`
from those hidden states, inside the classifier module's own call so that FSDP / DeepSpeed hooks on
it gather its weight). The output gets ``logits=None`` and ``outputs.crossent``
(:class:`TrainingStats`). Any other call runs the original forward untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..functional import linear_cross_entropy
from ..loss_aux import LossAux

#: The key, in a patched model's ``__dict__``, of its :class:`PatchState`.
STATE = "_crossent_patch"


class TrainingStats(NamedTuple):
    """What a patched training forward reports as ``outputs.crossent`` (all detached, 0-dim).

    Fields:
        ce: the cross-entropy part of ``outputs.loss``, normalised as the loss is (mean over the
            kept tokens, or divided by ``num_items_in_batch``).
        z_loss: the z-loss part ``c·lse²``, normalised the same way (0 when ``z_loss=0``). The
            loss is ``ce + z_loss`` plus what the family adds itself (MoE: ``outputs.aux_loss``
            times ``router_aux_loss_coef``).
        accuracy: fraction of the kept (non-ignored) tokens whose argmax is the label.
        entropy: mean entropy, in nats, of the predicted distribution over the kept tokens.
        n_tokens: number of kept tokens (int64).
        aux: the full :class:`crossent.LossAux` (per-token ``lse`` and ``entropy``; its ``ce`` and
            ``z_loss`` are normalised like the loss).

    Example:
        >>> import torch, crossent.transformers
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
        >>> model = crossent.transformers.patch(model, z_loss=1e-4)
        >>> out = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8)))
        >>> type(out.crossent).__name__, out.crossent.accuracy.shape
        ('TrainingStats', torch.Size([]))
    """

    ce: Tensor
    z_loss: Tensor
    accuracy: Tensor
    entropy: Tensor
    n_tokens: Tensor
    aux: LossAux


@dataclasses.dataclass
class PatchState:
    """What ``patch`` stores on the model (under :data:`STATE`)."""

    head_name: str
    head: nn.Linear
    options: dict  # linear_cross_entropy's fixed options (z_loss, label_smoothing, softcap, ...)
    instance_forward: Callable | None  # a forward set on the instance before patch(), else None
    signature: inspect.Signature
    family: str


class _Capture(nn.Module):
    """Stands in for the classifier during the original forward: keeps its input, returns an
    empty (..., 0) tensor instead of the logits (so that a family's soft cap costs nothing)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        object.__setattr__(self, "_head", head)  # not registered: the stand-in owns nothing
        self.hidden: Tensor | None = None
        self.calls = 0

    def forward(self, hidden: Tensor) -> Tensor:
        self.calls += 1
        self.hidden = hidden
        return hidden.new_empty((*hidden.shape[:-1], 0))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_head"), name)


def _head_loss(head: nn.Linear, hidden: Tensor, target: Tensor, options: dict):
    """Run the classifier module (its hooks included) with a forward that returns the fused loss."""

    def fused_forward(hidden: Tensor, target: Tensor):
        return linear_cross_entropy(hidden, head.weight, target, bias=head.bias, return_aux=True, **options)

    if "forward" in head.__dict__:
        raise RuntimeError(
            "crossent: the classifier got an instance-level forward after patch() (e.g. an accelerate hook); "
            "unpatch the model and patch it after that wrapping, or before it without the hook"
        )
    head.forward = fused_forward  # this call only: the module stays an nn.Linear
    try:
        return head(hidden, target)
    finally:
        del head.forward


class _LossCall:
    """Stands in for ``model.loss_function`` (transformers' ForCausalLMLoss, same arguments)."""

    def __init__(self, head: nn.Linear, capture: _Capture, options: dict, per_token: bool):
        self.head, self.capture, self.options, self.per_token = head, capture, options, per_token
        self.calls = 0
        self.stats: TrainingStats | None = None
        self.token_loss: Tensor | None = None

    def __call__(
        self,
        logits=None,
        labels=None,
        vocab_size=None,
        num_items_in_batch=None,
        ignore_index: int = -100,
        shift_labels=None,
        **kwargs,
    ):
        self.calls += 1
        hidden = self.capture.hidden
        if hidden is None:
            raise RuntimeError("crossent: the model computed its loss without calling its classifier first")
        lead = hidden.shape[:-1]
        if shift_labels is not None:  # already aligned with the positions: no shift (transformers' rule)
            target, shift = shift_labels, 0
            if target.shape != lead and target.numel() == lead.numel():
                target = target.reshape(lead)
        else:
            target, shift = labels, 1
        target = target.to(hidden.device)
        reduction = "mean" if num_items_in_batch is None else "sum"
        options = dict(self.options, shift=shift, reduction=reduction, ignore_index=ignore_index)
        loss, aux = _head_loss(self.head, hidden, target, options)
        ce, zl = aux.ce, aux.z_loss
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
            ce, zl = ce / num_items_in_batch, zl / num_items_in_batch
        aux = aux._replace(ce=ce.detach(), z_loss=zl.detach())
        entropy = aux.entropy.sum() / aux.n_tokens.clamp(min=1)
        self.stats = TrainingStats(aux.ce, aux.z_loss, aux.accuracy, entropy, aux.n_tokens, aux)
        if self.per_token:
            with torch.no_grad():
                per_token = dict(options, reduction="none")
                self.token_loss = linear_cross_entropy(
                    hidden, self.head.weight, target, bias=self.head.bias, **per_token
                )
        return loss


def _keeps_all_logits(logits_to_keep) -> bool:
    return logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0)


def original_forward(model: nn.Module, state: PatchState) -> Callable:
    """The forward ``model`` had before ``patch``, bound to it."""
    if state.instance_forward is not None:
        return state.instance_forward
    return types.MethodType(type(model).forward, model)


def fused_call(model: nn.Module, state: PatchState, args, kwargs, options: dict, per_token: bool = False):
    """Run the model's own forward with the classifier and the loss function stood in for."""
    from transformers.utils import ModelOutput

    original = original_forward(model, state)
    head, name = state.head, state.head_name
    if model._modules.get(name) is not head:
        raise RuntimeError(
            f"crossent: model.{name} was replaced after patch(); call crossent.transformers.unpatch(model) and "
            "patch it again"
        )
    want_tuple = kwargs.get("return_dict", getattr(model.config, "return_dict", True)) is False
    if want_tuple:
        kwargs = {**kwargs, "return_dict": True}
    capture = _Capture(head)
    call = _LossCall(head, capture, options, per_token)
    from transformers.loss.loss_utils import LOSS_MAPPING

    had_loss_function = "_loss_function" in model.__dict__
    previous = model.__dict__.get("_loss_function")
    if had_loss_function and previous is not LOSS_MAPPING["ForCausalLM"]:
        raise RuntimeError(
            f"crossent: model.loss_function was set to {previous!r} after patch(); crossent replaces transformers' "
            "ForCausalLMLoss only. Unpatch the model to use a custom loss"
        )
    model._modules[name] = capture
    model.__dict__["_loss_function"] = call
    try:
        out = original(*args, **kwargs)
    finally:
        model._modules[name] = head
        if had_loss_function:
            model.__dict__["_loss_function"] = previous
        else:
            model.__dict__.pop("_loss_function", None)
    if capture.calls != 1 or call.calls != 1:
        raise RuntimeError(
            f"crossent: {state.family}.forward called its classifier {capture.calls} time(s) and its loss "
            f"function {call.calls} time(s) in one training step; the fused loss needs exactly one of each"
        )
    if not isinstance(out, ModelOutput):
        raise RuntimeError(f"crossent: {state.family}.forward returned a {type(out).__name__}, not a ModelOutput")
    out = dataclasses.replace(out, logits=None) if "logits" in {f.name for f in dataclasses.fields(out)} else out
    out.crossent = call.stats  # not a dataclass field: to_tuple() and indexing are unchanged
    if per_token:
        out.crossent_token_loss = call.token_loss
    return out.to_tuple() if want_tuple else out


def _patched_forward(self, *args, **kwargs):
    state: PatchState | None = self.__dict__.get(STATE)
    if state is None:  # unpatched under our feet (e.g. a copy): the class's forward
        return type(self).forward(self, *args, **kwargs)
    if not self.training:
        return original_forward(self, state)(*args, **kwargs)
    if "labels" in kwargs and not args:
        labels, logits_to_keep = kwargs["labels"], kwargs.get("logits_to_keep", 0)
    else:
        try:
            bound = state.signature.bind_partial(*args, **kwargs).arguments
        except TypeError:  # let the original forward raise its own error
            return original_forward(self, state)(*args, **kwargs)
        labels, logits_to_keep = bound.get("labels"), bound.get("logits_to_keep", 0)
    if labels is None or not _keeps_all_logits(logits_to_keep):
        return original_forward(self, state)(*args, **kwargs)
    return fused_call(self, state, args, kwargs, state.options)


def make_forward(original: Callable, signature: inspect.Signature) -> Callable:
    """A fresh function per patch: ``functools.wraps`` of the original, with its exact signature."""

    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)

    functools.update_wrapper(forward, original)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])
    return forward
