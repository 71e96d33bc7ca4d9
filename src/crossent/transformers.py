"""Hugging Face ``transformers`` integration: a causal LM trains with the fused loss, in one line.

    >>> import torch, crossent.transformers
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    >>> model = crossent.transformers.patch(model, z_loss=1e-4)   # any transformers 5.x *ForCausalLM
    >>> out = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8)))
    >>> out.logits is None, out.loss.shape                         # in training: the fused loss, no logits
    (True, torch.Size([]))
    >>> [t.shape for t in (out.crossent.z_loss, out.crossent.accuracy, out.crossent.entropy)]  # for logging
    [torch.Size([]), torch.Size([]), torch.Size([])]
    >>> crossent.transformers.is_patched(crossent.transformers.unpatch(model))  # exactly as before
    False

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
forward runs untouched. transformers is imported only by this integration
(implemented in :mod:`crossent.integrations`), and only when it is used.

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

# The implementation lives in crossent.integrations, split by idea: hf_families (what each family
# does to its logits), hf_forward (the patched training forward) and hf_patch (patch, unpatch,
# is_patched and their checks). This module is the public face.
from .integrations.hf_families import LOGIT_TRANSFORMS  # noqa: F401  (named by patch's errors; not in __all__)
from .integrations.hf_forward import TrainingStats
from .integrations.hf_patch import is_patched, patch, unpatch

__all__ = ["patch", "unpatch", "is_patched", "TrainingStats"]
