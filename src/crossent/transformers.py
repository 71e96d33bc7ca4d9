"""Hugging Face ``transformers`` integration: a causal LM trains with the fused loss, in one line.

    import crossent.transformers
    crossent.transformers.patch(model, z_loss=1e-4)      # any transformers 5.x *ForCausalLM
    out = model(input_ids, labels=labels)                 # in training: the fused loss, logits None
    out.crossent.z_loss, out.crossent.accuracy, out.crossent.entropy   # for logging (detached)
    crossent.transformers.unpatch(model)                  # exactly as before

What :func:`patch` changes, and only while ``model.training`` and ``labels`` are given: the
model's own forward still runs (decoder, MoE routers, caches, everything), but its classifier
call is intercepted and no logits are built; the loss is computed by
:func:`crossent.linear_cross_entropy` from the classifier's input (the decoder's final hidden
states) and the classifier's weight and bias, *inside the classifier module's own forward* (so
FSDP / DeepSpeed ZeRO-3 hooks on ``lm_head`` gather it; a weight tied to the input embedding is
the same Parameter and keeps working). Everything transformers does with labels is kept: the
causal shift (or its ``shift_labels`` argument), ``ignore_index``, ``num_items_in_batch`` (sum
divided by it, as ``Trainer`` uses for gradient accumulation), and whatever the family adds to the
loss afterwards (the MoE router auxiliary loss, ``router_aux_loss_coef * aux_loss``), because the
family's own code adds it to crossent's loss. The output has ``logits=None`` and an extra attribute
``crossent`` (:class:`TrainingStats`). In eval mode, in generation, or without labels the original
forward runs untouched. transformers is imported only by this module, and only when it is used.

Logit transforms between the classifier and the loss are read from the forward's own source and
accepted only when they are known: none (most families), ``final_logit_softcapping`` (Gemma 2/3,
...) as ``softcap``, and, for an explicit allow-list of families, Granite's division by
``logits_scaling`` (``logit_scale = 1/logits_scaling``), Cohere's multiplication by ``logit_scale``
and RecurrentGemma's ``logits_soft_cap``. Anything else, or a family outside the allow-list whose
config carries a logit-scaling attribute, is refused with an error naming it (pass ``logit_scale=``
/ ``softcap=`` explicitly to override, preferably with ``check=True``). Refused as well, never
silently trained without their extra term: LoRA-wrapped (peft), ``modules_to_save`` and quantised
classifiers.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .functional import linear_cross_entropy
from .loss_aux import LossAux
from .options import LossOptions

__all__ = ["patch", "unpatch", "is_patched", "TrainingStats"]

_STATE = "_crossent_patch"
_AUTO = "auto"


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


# --------------------------------------------------------------------------------------------
# Logit transforms: recognised from the forward's source, and an allow-list of families
# --------------------------------------------------------------------------------------------

_SOFTCAP_LINES = (
    "if self.config.final_logit_softcapping is not None:",
    "logits = logits / self.config.final_logit_softcapping",
    "logits = torch.tanh(logits)",
    "logits = logits * self.config.final_logit_softcapping",
)
_SOFTCAP_FLOAT_LINES = (
    "if self.config.final_logit_softcapping is not None:",
    "logits = logits.float() / self.config.final_logit_softcapping",
    "logits = torch.tanh(logits)",
    "logits = logits * self.config.final_logit_softcapping",
)
_GRANITE_LINES = ("logits = logits / self.config.logits_scaling",)
_COHERE_LINES = ("logits = logits * self.logit_scale",)
_RECURRENT_GEMMA_LINES = ("cap = self.config.logits_soft_cap", "logits = nn.functional.tanh(logits / cap) * cap")


def _final_softcap(model) -> tuple[float, float | None]:
    return 1.0, model.config.final_logit_softcapping


def _granite(model) -> tuple[float, float | None]:
    return 1.0 / model.config.logits_scaling, None


def _cohere(model) -> tuple[float, float | None]:
    return float(model.logit_scale), None


def _recurrent_gemma(model) -> tuple[float, float | None]:
    return 1.0, model.config.logits_soft_cap


#: The allow-list: transformers family (class name) -> (source lines between the classifier call
#: and the loss call, the (logit_scale, softcap) they amount to, the config attributes they consume).
#: A family not listed here is accepted only when nothing stands between its classifier and its loss.
LOGIT_TRANSFORMS: dict[str, tuple[tuple[str, ...], Callable, tuple[str, ...]]] = {
    **{
        name: (_SOFTCAP_LINES, _final_softcap, ("final_logit_softcapping",))
        for name in (
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "Gemma3nForCausalLM",
            "Gemma4ForCausalLM",
            "Gemma4UnifiedForCausalLM",
            "VaultGemmaForCausalLM",
            "NanoChatForCausalLM",
        )
    },
    "BeamForCausalLM": (_SOFTCAP_FLOAT_LINES, _final_softcap, ("final_logit_softcapping",)),
    **{
        name: (_GRANITE_LINES, _granite, ("logits_scaling",))
        for name in (
            "GraniteForCausalLM",
            "GraniteSWAForCausalLM",
            "GraniteMoeForCausalLM",
            "GraniteMoeSWAForCausalLM",
            "GraniteMoeHybridForCausalLM",
            "GraniteMoeSharedForCausalLM",
        )
    },
    **{
        name: (_COHERE_LINES, _cohere, ("logit_scale",))
        for name in ("CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM", "CohereCompassForCausalLM")
    },
    "RecurrentGemmaForCausalLM": (_RECURRENT_GEMMA_LINES, _recurrent_gemma, ("logits_soft_cap",)),
}

# Config attributes that scale or cap the output logits (or cut the vocabulary) in some family.
_SCALING_NAME = re.compile(r"logit|lm_head|output_multiplier|mup|width_multiplier|unpadded_vocab")
_NOT_SCALING = re.compile(r"attn|attention|router|moe|init|contrastive|lsd_|num_logits_to_keep|auxiliary|per_cell")


def _scaling_attributes(config) -> dict[str, Any]:
    """Config attributes (top level) that look like a logit scaling and are not neutral."""
    found = {}
    for name, value in config.to_dict().items():
        if not _SCALING_NAME.search(name) or _NOT_SCALING.search(name) or isinstance(value, dict):
            continue
        if value is None or value is False:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1:
            continue
        if name == "unpadded_vocab_size" and value == getattr(config, "vocab_size", None):
            continue
        found[name] = value
    return found


def _transformers_class(model: nn.Module) -> type:
    """The family: the first transformers ``*ForCausalLM`` class of the model's MRO (FSDP2 and
    other wrappers subclass it dynamically); for remote-code models, their own such class."""
    from transformers import PreTrainedModel

    candidates = [
        cls
        for cls in type(model).__mro__
        if cls.__name__.endswith("ForCausalLM") and not cls.__module__.startswith("torch.")
    ]
    if not isinstance(model, PreTrainedModel) or not candidates:
        raise TypeError(
            f"crossent.transformers.patch needs a transformers *ForCausalLM model, got {type(model).__name__} "
            "(for a peft model, patch peft_model.get_base_model(); for a wrapped model, patch the inner "
            "transformers model before wrapping it)"
        )
    for cls in candidates:
        if cls.__module__.startswith("transformers."):
            return cls
    return candidates[0]


def _matching_paren(src: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(src)):
        if src[i] == "(":
            depth += 1
        elif src[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _transform_lines(forward: Callable, head_name: str, family: str) -> list[str]:
    """The source lines between the classifier call and the loss call of ``forward``."""
    try:
        src = inspect.getsource(inspect.unwrap(forward))
    except (OSError, TypeError) as error:
        raise ValueError(
            f"crossent.transformers.patch reads {family}.forward's source to see what it does to the "
            f"logits, and cannot ({error}); pass logit_scale= and softcap= explicitly (and check=True)"
        ) from None
    call = f"self.{head_name}("
    if src.count(call) != 1 or src.count("self.loss_function(") != 1:
        raise ValueError(
            f"{family}.forward does not call self.{head_name}(...) and self.loss_function(...) exactly once "
            f"each (found {src.count(call)} and {src.count('self.loss_function(')}): crossent can only "
            "replace transformers' causal-LM loss computed from the classifier's output"
        )
    head_at = src.index(call)
    close = _matching_paren(src, head_at + len(call) - 1)
    loss_at = src.index("self.loss_function(")
    if close < 0 or loss_at < close:
        raise ValueError(f"{family}.forward computes its loss before calling its classifier: not supported")
    start = src.find("\n", close) + 1
    stop = src.rfind("\n", 0, loss_at) + 1
    lines = [line.split("#", 1)[0].strip() for line in src[start:stop].splitlines()]
    return [line for line in lines if line and line not in ("loss = None", "if labels is not None:")]


def _resolve_transform(model, family: str, head_name: str, logit_scale, softcap) -> tuple[float, float | None]:
    if logit_scale != _AUTO or softcap != _AUTO:
        # the caller states the transform; the family table is not consulted
        return (1.0 if logit_scale == _AUTO else logit_scale), (None if softcap == _AUTO else softcap)
    cls = _transformers_class(model)
    lines = tuple(_transform_lines(type(model).forward, head_name, family))
    consumed: tuple[str, ...] = ()
    if family in LOGIT_TRANSFORMS:
        expected, derive, consumed = LOGIT_TRANSFORMS[family]
        if lines != expected:
            raise ValueError(
                f"{family}.forward transforms its logits as {list(lines)}, not as crossent's allow-list "
                f"expects ({list(expected)}): this transformers version differs; pass logit_scale= and "
                "softcap= explicitly (and check=True)"
            )
        scale, cap = derive(model)
    elif lines:
        raise ValueError(
            f"{family}.forward changes the logits between its classifier and its loss ({'; '.join(lines)}), "
            "and the family is not on crossent's allow-list (crossent.transformers.LOGIT_TRANSFORMS): the fused "
            "loss would differ from the model's own. Pass logit_scale= and softcap= explicitly if you know the "
            "transform, with check=True"
        )
    else:
        scale, cap = 1.0, None
    unknown = {k: v for k, v in _scaling_attributes(model.config).items() if k not in consumed}
    if unknown:
        raise ValueError(
            f"{family} ({cls.__module__}) is not on crossent's allow-list for logit scalings, and its config sets "
            f"{', '.join(f'{k}={v!r}' for k, v in unknown.items())}, which may scale or cap its logits: refusing "
            "rather than training a different loss. Pass logit_scale= and softcap= explicitly (check=True verifies "
            "them against the model's own loss)"
        )
    return float(scale), (None if cap is None else float(cap))


# --------------------------------------------------------------------------------------------
# The classifier: what is accepted
# --------------------------------------------------------------------------------------------

_HOOK_OWNERS = ("torch.distributed", "torch.nn.parallel", "deepspeed", "accelerate")


def _hook_module(hook) -> str:
    while isinstance(hook, functools.partial):
        hook = hook.func
    return getattr(getattr(hook, "__func__", hook), "__module__", "") or ""


def _check_head(model: nn.Module, family: str) -> tuple[str, nn.Linear]:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{family} has no output embedding (get_output_embeddings() is None): nothing to fuse")
    where = f"{family}'s classifier ({type(head).__name__})"
    if any(hasattr(head, a) for a in ("lora_A", "lora_B", "lora_embedding_A", "base_layer")):
        raise ValueError(
            f"{where} is LoRA-wrapped (peft): crossent's fused loss uses the base weight only and would train "
            "without the adapter's term. Merge the adapter (merge_and_unload()) or leave lm_head out of "
            "target_modules"
        )
    if hasattr(head, "modules_to_save") or hasattr(head, "original_module"):
        raise ValueError(
            f"{where} is a peft modules_to_save wrapper: which copy trains depends on the active adapter, "
            "which crossent does not follow. Leave lm_head out of modules_to_save, or merge first"
        )
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{where} is not an nn.Linear; crossent fuses a plain linear classifier only")
    weight = head.weight
    if type(head).forward is not nn.Linear.forward:
        raise ValueError(
            f"{where} overrides nn.Linear.forward (a quantised layer such as bitsandbytes' Linear4bit/Linear8bitLt, "
            "or another wrapper): its logits are not hidden @ weight.T + bias, so the fused loss would differ"
        )
    if "forward" in head.__dict__:
        raise ValueError(
            f"{where} has an instance-level forward (e.g. an accelerate device-map hook): crossent needs the "
            "module's own forward; patch before dispatching the model"
        )
    if not weight.is_floating_point() or weight.element_size() < 2 or hasattr(weight, "quant_state"):
        raise ValueError(f"{where} has a quantised weight (dtype {weight.dtype}); crossent needs 16/32/64-bit floats")
    if type(weight) not in (nn.Parameter, torch.Tensor) and type(weight).__name__ != "DTensor":
        raise ValueError(
            f"{where}'s weight is a {type(weight).__name__} tensor subclass (quantised, e.g. torchao): "
            "crossent needs a plain floating weight"
        )
    for hook in head._forward_hooks.values():
        if not _hook_module(hook).startswith(_HOOK_OWNERS):
            raise ValueError(
                f"{where} has a forward hook ({hook!r}) that may change its logits, which the fused loss never "
                "builds: remove it before patching"
            )
    for name, child in model._modules.items():
        if child is head:
            return name, head
    raise ValueError(f"{where} is not a direct child module of the model: not supported")


# --------------------------------------------------------------------------------------------
# The patched forward
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _PatchState:
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


def _original_forward(model: nn.Module, state: _PatchState) -> Callable:
    if state.instance_forward is not None:
        return state.instance_forward
    return types.MethodType(type(model).forward, model)


def _fused_call(model: nn.Module, state: _PatchState, args, kwargs, options: dict, per_token: bool = False):
    """Run the model's own forward with the classifier and the loss function stood in for."""
    from transformers.utils import ModelOutput

    original = _original_forward(model, state)
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
    state: _PatchState | None = self.__dict__.get(_STATE)
    if state is None:  # unpatched under our feet (e.g. a copy): the class's forward
        return type(self).forward(self, *args, **kwargs)
    if not self.training:
        return _original_forward(self, state)(*args, **kwargs)
    if "labels" in kwargs and not args:
        labels, logits_to_keep = kwargs["labels"], kwargs.get("logits_to_keep", 0)
    else:
        try:
            bound = state.signature.bind_partial(*args, **kwargs).arguments
        except TypeError:  # let the original forward raise its own error
            return _original_forward(self, state)(*args, **kwargs)
        labels, logits_to_keep = bound.get("labels"), bound.get("logits_to_keep", 0)
    if labels is None or not _keeps_all_logits(logits_to_keep):
        return _original_forward(self, state)(*args, **kwargs)
    return _fused_call(self, state, args, kwargs, state.options)


def _make_forward(original: Callable, signature: inspect.Signature) -> Callable:
    """A fresh function per patch: ``functools.wraps`` of the original, with its exact signature."""

    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)

    functools.update_wrapper(forward, original)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])
    return forward


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` is in effect on ``model``.

    Example:
        >>> import torch, crossent.transformers
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
        >>> crossent.transformers.is_patched(model)
        False
        >>> crossent.transformers.is_patched(crossent.transformers.patch(model))
        True
    """
    return _STATE in model.__dict__


def patch(
    model: nn.Module,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    softcap: float | None | str = _AUTO,
    logit_scale: float | str = _AUTO,
    chunk_size: int | None = None,
    schedule: str = "auto",
    impl: str = "auto",
    check: bool = False,
) -> nn.Module:
    """Make a transformers 5.x ``*ForCausalLM`` train with crossent's fused loss; returns ``model``.

    In training mode with ``labels``, the forward returns the loss of
    :func:`crossent.linear_cross_entropy` on the classifier's input and weight (``logits=None``,
    no logits built) and ``outputs.crossent`` (:class:`TrainingStats`: ``ce``, ``z_loss``,
    ``accuracy``, ``entropy``, ``n_tokens``, ``aux``). The shift, ``shift_labels``,
    ``ignore_index`` and ``num_items_in_batch`` are honoured exactly as transformers' own causal-LM
    loss does; the family's extra terms (MoE router loss) are added by its own code. In eval mode,
    without labels, with ``logits_to_keep`` set or in ``generate`` the model runs as before.
    Patching a patched model replaces its options.

    Args:
        model: a transformers ``*ForCausalLM`` (patch it before FSDP / DeepSpeed / peft wrap it, or
            patch the inner transformers model). Its classifier must be a plain ``nn.Linear``
            (LoRA-wrapped, ``modules_to_save`` and quantised classifiers are refused).
        z_loss: PaLM's z-loss coefficient c >= 0 (1e-4 is usual); reported in
            ``outputs.crossent.z_loss``.
        label_smoothing: ε in [0, 1] (PyTorch's definition).
        softcap, logit_scale: ``"auto"`` (default) derives the logit transform from the family:
            ``final_logit_softcapping`` becomes ``softcap``, and the allow-listed Granite / Cohere /
            RecurrentGemma scalings become ``logit_scale`` / ``softcap``; an unknown transform, or a
            family outside the allow-list whose config sets a logit-scaling attribute, raises
            ``ValueError``. Giving either explicitly states the transform yourself (the other
            defaults to none): use it with ``check=True``.
        chunk_size, schedule, impl: passed to :func:`crossent.linear_cross_entropy`.
        check: also run the model on 2 x 16 random tokens (in eval mode, without gradients) with
            its own loss and with the fused one (without z-loss and smoothing) and raise
            ``ValueError``, leaving the model unpatched, when the losses or the per-token losses
            differ by more than 1e-4 relative (3e-2 for 16-bit weights). On a randomly initialised
            model the logits are small and the check is weak; on a trained one it is sharp.

    Example:
        >>> import torch, crossent.transformers
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
        >>> model = crossent.transformers.patch(model, z_loss=1e-4, check=True)
        >>> out = model(input_ids=torch.randint(0, 512, (2, 8)), labels=torch.randint(0, 512, (2, 8)))
        >>> out.logits is None, out.loss.shape, out.crossent.accuracy.shape
        (True, torch.Size([]), torch.Size([]))
    """
    import transformers  # noqa: F401  (the lazy import: only here)
    from transformers.loss.loss_utils import LOSS_MAPPING

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers *ForCausalLM (nn.Module), got {type(model).__name__}")
    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool, got {type(check).__name__} {check!r}")
    if logit_scale != _AUTO and isinstance(logit_scale, str):
        raise ValueError(f'logit_scale must be "auto" or a finite, non-zero float, got {logit_scale!r}')
    if softcap != _AUTO and isinstance(softcap, str):
        raise ValueError(f'softcap must be "auto", None or a float > 0, got {softcap!r}')
    family = _transformers_class(model).__name__
    own_loss = model.loss_function
    if own_loss is not LOSS_MAPPING["ForCausalLM"]:
        raise ValueError(
            f"{family}'s loss_function is {getattr(own_loss, '__name__', own_loss)!r}, not transformers' "
            "ForCausalLMLoss: crossent replaces exactly that loss (unset the custom loss_function to use crossent)"
        )
    head_name, head = _check_head(model, family)
    scale, cap = _resolve_transform(model, family, head_name, logit_scale, softcap)
    # validate every option now, with the names the user gave
    options = LossOptions(
        z_loss=z_loss,
        label_smoothing=label_smoothing,
        softcap=cap,
        logit_scale=scale,
        chunk_size=chunk_size,
        schedule=schedule,
        impl=impl,
    )
    if is_patched(model):  # validated above: now replace the old options
        unpatch(model)
    instance_forward = model.__dict__.get("forward")
    original = instance_forward if instance_forward is not None else type(model).forward
    signature = inspect.signature(
        instance_forward if instance_forward is not None else types.MethodType(original, model)
    )
    if "labels" not in signature.parameters:
        raise ValueError(f"{family}.forward has no labels argument: not a causal LM crossent can patch")
    state = _PatchState(
        head_name=head_name,
        head=head,
        options=dict(
            z_loss=options.z_loss,
            label_smoothing=options.label_smoothing,
            softcap=options.softcap,
            logit_scale=options.logit_scale,
            chunk_size=options.chunk_size,
            schedule=options.schedule,
            impl=options.impl,
        ),
        instance_forward=instance_forward,
        signature=signature,
        family=family,
    )
    model.__dict__[_STATE] = state
    model.forward = types.MethodType(_make_forward(original, signature), model)
    if check:
        try:
            _check(model, state)
        except BaseException:
            unpatch(model)
            raise
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the model's forward is again exactly what it was. Returns ``model``
    (a model that is not patched is returned unchanged).

    Args:
        model: a model given to :func:`patch` (or any module).

    Example:
        >>> import torch, crossent.transformers
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
        >>> model = crossent.transformers.unpatch(crossent.transformers.patch(model))
        >>> crossent.transformers.is_patched(model)
        False
    """
    state: _PatchState | None = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    if state.instance_forward is not None:
        model.forward = state.instance_forward
    else:
        model.__dict__.pop("forward", None)
    return model


def _check(model: nn.Module, state: _PatchState) -> None:
    """Compare the fused loss with the model's own on 2 x 16 random tokens (see :func:`patch`)."""
    head = state.head
    vocab = head.out_features
    length = min(16, getattr(model.config, "max_position_embeddings", 16) or 16)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, length), generator=generator)
    labels = ids.clone()
    labels[0, : length // 4] = -100
    device = model.get_input_embeddings().weight.device
    ids, labels = ids.to(device), labels.to(device)
    options = dict(state.options, z_loss=0.0, label_smoothing=0.0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own = _original_forward(model, state)(input_ids=ids, labels=labels)
            ours = _fused_call(model, state, (), dict(input_ids=ids, labels=labels), options, per_token=True)
    finally:
        model.train(was_training)
    logits = own.logits.float()
    own_tokens = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="none"
    ).reshape(labels.shape[0], -1)
    our_tokens = ours.crossent_token_loss[:, :-1].float()
    tolerance = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 3e-2

    def rel(a: Tensor, b: Tensor) -> float:
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm().clamp(min=1e-30))

    errors = {"loss": rel(ours.loss, own.loss), "per-token loss": rel(our_tokens, own_tokens)}
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    if bad:
        found = ", ".join(f"{k} differs by {v:.2e} relative" for k, v in bad.items())
        raise ValueError(
            f"crossent.transformers.patch(check=True): on {state.family} the fused loss does not match the model's "
            f"own ({found}; tolerance {tolerance:g}; own loss {float(own.loss):.6g}, fused "
            f"{float(ours.loss):.6g}, logit_scale={state.options['logit_scale']}, softcap={state.options['softcap']}). "
            "The model transforms its logits in a way crossent does not reproduce: not patched"
        )
