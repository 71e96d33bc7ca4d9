"""``patch``, ``unpatch`` and ``is_patched`` of :mod:`crossent.transformers`, and the checks they make.

:func:`patch` accepts a transformers ``*ForCausalLM`` whose loss is transformers' own causal-LM
loss and whose classifier is a plain ``nn.Linear`` (:func:`_check_head`), resolves the family's
logit transform (:mod:`crossent.integrations.hf_families`), and sets an instance-level forward
(:mod:`crossent.integrations.hf_forward`); with ``check=True`` it compares the fused loss with the
model's own (:func:`_check`). :func:`unpatch` removes that forward again.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
from torch import Tensor, nn

from ..options import LossOptions
from .hf_families import AUTO, resolve_transform, transformers_class
from .hf_forward import STATE, PatchState, fused_call, make_forward, original_forward

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
    return STATE in model.__dict__


def patch(
    model: nn.Module,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    softcap: float | None | str = AUTO,
    logit_scale: float | str = AUTO,
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
    if logit_scale != AUTO and isinstance(logit_scale, str):
        raise ValueError(f'logit_scale must be "auto" or a finite, non-zero float, got {logit_scale!r}')
    if softcap != AUTO and isinstance(softcap, str):
        raise ValueError(f'softcap must be "auto", None or a float > 0, got {softcap!r}')
    family = transformers_class(model).__name__
    own_loss = model.loss_function
    if own_loss is not LOSS_MAPPING["ForCausalLM"]:
        raise ValueError(
            f"{family}'s loss_function is {getattr(own_loss, '__name__', own_loss)!r}, not transformers' "
            "ForCausalLMLoss: crossent replaces exactly that loss (unset the custom loss_function to use crossent)"
        )
    head_name, head = _check_head(model, family)
    scale, cap = resolve_transform(model, family, head_name, logit_scale, softcap)
    given = dict(z_loss=z_loss, label_smoothing=label_smoothing, chunk_size=chunk_size, schedule=schedule, impl=impl)
    # validate every option now, with the names the user gave; the state keeps the validated values
    options = LossOptions(softcap=cap, logit_scale=scale, **given)
    if is_patched(model):  # validated above: now replace the old options
        unpatch(model)
    instance_forward = model.__dict__.get("forward")
    original = instance_forward if instance_forward is not None else type(model).forward
    signature = inspect.signature(
        instance_forward if instance_forward is not None else types.MethodType(original, model)
    )
    if "labels" not in signature.parameters:
        raise ValueError(f"{family}.forward has no labels argument: not a causal LM crossent can patch")
    state = PatchState(
        head_name=head_name,
        head=head,
        options={name: getattr(options, name) for name in ("softcap", "logit_scale", *given)},
        instance_forward=instance_forward,
        signature=signature,
        family=family,
    )
    model.__dict__[STATE] = state
    model.forward = types.MethodType(make_forward(original, signature), model)
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
    state: PatchState | None = model.__dict__.pop(STATE, None)
    if state is None:
        return model
    if state.instance_forward is not None:
        model.forward = state.instance_forward
    else:
        model.__dict__.pop("forward", None)
    return model


def _check(model: nn.Module, state: PatchState) -> None:
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
            own = original_forward(model, state)(input_ids=ids, labels=labels)
            ours = fused_call(model, state, (), dict(input_ids=ids, labels=labels), options, per_token=True)
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
