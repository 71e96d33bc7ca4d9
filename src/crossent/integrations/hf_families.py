"""What a transformers family does to its logits between its classifier and its loss.

:func:`resolve_transform` reads the lines between the two calls from the family's own ``forward``
source and turns them into crossent's ``(logit_scale, softcap)``. Known lines are accepted: none
(most families), and, for the families of the allow-list :data:`LOGIT_TRANSFORMS`, Gemma 2's final
soft cap, Granite's ``logits_scaling``, Cohere's ``logit_scale`` and RecurrentGemma's
``logits_soft_cap``. Anything else, or a config attribute that looks like a logit scaling and that
no known line consumes, is refused with an error naming it.
"""

from __future__ import annotations

import inspect
import operator
import re
from collections.abc import Callable
from typing import Any

from torch import nn

#: ``patch``'s default for ``softcap=`` and ``logit_scale=``: derive both from the family.
AUTO = "auto"

#: How a family's transform becomes ``(logit_scale, softcap)``, given the model.
Derive = Callable[[nn.Module], tuple[float, "float | None"]]


def _softcap_lines(divided: str) -> tuple[str, ...]:
    """Gemma 2's final soft cap as the forwards write it; ``divided`` is what the first line divides
    (Beam casts the logits to float32 there)."""
    return (
        "if self.config.final_logit_softcapping is not None:",
        f"logits = {divided} / self.config.final_logit_softcapping",
        "logits = torch.tanh(logits)",
        "logits = logits * self.config.final_logit_softcapping",
    )


def _reading(path: str, kind: str) -> Derive:
    """The ``(logit_scale, softcap)`` of a transform that applies ``kind`` with the value at
    ``model.<path>``: ``"softcap"`` caps the logits at it (``None``: the config sets no cap),
    ``"divide"`` and ``"multiply"`` scale them by it."""
    read = operator.attrgetter(path)

    def derive(model: nn.Module) -> tuple[float, float | None]:
        value = read(model)
        if kind == "softcap":
            return 1.0, value
        return (1.0 / value if kind == "divide" else float(value)), None

    return derive


def _transform(lines: tuple[str, ...], path: str, kind: str) -> tuple[tuple[str, ...], Derive, tuple[str, ...]]:
    """An allow-list entry. The value at ``model.<path>`` comes from the config attribute of the same
    name (Cohere copies ``config.logit_scale`` to ``model.logit_scale``), which the lines consume."""
    return lines, _reading(path, kind), (path.rsplit(".", 1)[-1],)


_FINAL_SOFTCAP = _transform(_softcap_lines("logits"), "config.final_logit_softcapping", "softcap")

#: The allow-list: transformers family (class name) -> (source lines between the classifier call
#: and the loss call, the (logit_scale, softcap) they amount to, the config attributes they consume).
#: A family not listed here is accepted only when nothing stands between its classifier and its loss.
LOGIT_TRANSFORMS: dict[str, tuple[tuple[str, ...], Derive, tuple[str, ...]]] = {
    family: transform
    for families, transform in {
        (
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "Gemma3nForCausalLM",
            "Gemma4ForCausalLM",
            "Gemma4UnifiedForCausalLM",
            "VaultGemmaForCausalLM",
            "NanoChatForCausalLM",
        ): _FINAL_SOFTCAP,
        ("BeamForCausalLM",): _transform(_softcap_lines("logits.float()"), "config.final_logit_softcapping", "softcap"),
        (
            "GraniteForCausalLM",
            "GraniteSWAForCausalLM",
            "GraniteMoeForCausalLM",
            "GraniteMoeSWAForCausalLM",
            "GraniteMoeHybridForCausalLM",
            "GraniteMoeSharedForCausalLM",
        ): _transform(("logits = logits / self.config.logits_scaling",), "config.logits_scaling", "divide"),
        (
            "CohereForCausalLM",
            "Cohere2ForCausalLM",
            "Cohere2MoeForCausalLM",
            "CohereCompassForCausalLM",
        ): _transform(("logits = logits * self.logit_scale",), "logit_scale", "multiply"),
        ("RecurrentGemmaForCausalLM",): _transform(
            ("cap = self.config.logits_soft_cap", "logits = nn.functional.tanh(logits / cap) * cap"),
            "config.logits_soft_cap",
            "softcap",
        ),
    }.items()
    for family in families
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


def transformers_class(model: nn.Module) -> type:
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


def resolve_transform(model, family: str, head_name: str, logit_scale, softcap) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` for ``patch``: the caller's when either is given, else the
    family's, derived as the module docstring says (``ValueError`` when unknown)."""
    if logit_scale != AUTO or softcap != AUTO:
        # the caller states the transform; the family table is not consulted
        return (1.0 if logit_scale == AUTO else logit_scale), (None if softcap == AUTO else softcap)
    cls = transformers_class(model)
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
