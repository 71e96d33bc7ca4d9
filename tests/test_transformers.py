"""crossent.transformers: a patched Hugging Face causal LM trains with the fused loss, exactly.

Every model is built from a tiny random config (no download). The yardstick is the unpatched
model itself: loss and every parameter's gradient, float32, norm-wise relative 2e-5.
"""

from __future__ import annotations

import copy
import csv
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

transformers = pytest.importorskip("transformers", reason="crossent[transformers] is not installed")

from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

import crossent.transformers as ct  # noqa: E402
from judge import rel_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 2e-5
V = 211  # odd on purpose

COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# soft capping on and logits large enough that it matters (asserted in the test)
GEMMA = dict(final_logit_softcapping=2.0, initializer_range=0.2, query_pre_attn_scalar=8)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", GEMMA),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05),
    ),
}


def build(family: str, seed: int = 0, **overrides) -> nn.Module:
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config)


def batch(seed: int = 1, shape=(3, 12)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, shape, generator=generator)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 9:] = -100  # padding
    return ids, labels


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for name in ref:
        err = rel_error(ours[name], ref[name])
        assert err <= TOL, f"gradient of {name}: relative error {err:.2e}"


def shifted(labels: torch.Tensor) -> torch.Tensor:
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


# --------------------------------------------------------------------------------------------
# The families: loss, gradients, num_items_in_batch, shift_labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_loss_and_gradients_equal_the_models_own(family):
    model = build(family)
    model.train()
    ids, labels = batch()
    raw = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: raw.append(o.detach()))
    ref = model(input_ids=ids, labels=labels)
    ref.loss.backward()
    hook.remove()
    ref_grads = grads(model)
    n_items = torch.tensor(int((shifted(labels) != -100).sum()) + 5)  # as over several micro-batches
    ref_items = model(input_ids=ids, labels=labels, num_items_in_batch=n_items)
    ref_items.loss.backward()
    ref_items_grads = grads(model)
    custom_shift = torch.roll(labels, 2, dims=1)  # any alignment the caller wants
    ref_shift = model(input_ids=ids, labels=labels, shift_labels=custom_shift).loss.detach()

    if family.startswith("gemma"):
        cap = model.config.final_logit_softcapping
        assert raw[0].abs().max() > 2 * cap  # the cap bends the logits...
        uncapped = F.cross_entropy(raw[0][:, :-1].reshape(-1, V), shifted(labels)[:, :-1].reshape(-1))
        assert rel_error(uncapped, ref.loss) > 0.05  # ...and the loss
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied

    ct.patch(model)
    assert ct.is_patched(model)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    assert rel_error(out.loss, ref.loss) <= TOL
    if family == "mixtral":  # the router's auxiliary loss is kept, with the family's coefficient
        assert out.aux_loss is not None and rel_error(out.aux_loss, ref.aux_loss) <= TOL
        assert out.loss - out.crossent.ce > 0.01
    own_ce = ref.loss - model.config.router_aux_loss_coef * ref.aux_loss if family == "mixtral" else ref.loss
    assert rel_error(out.crossent.ce + out.crossent.z_loss, own_ce) <= TOL
    out.loss.backward()
    assert_same_grads(grads(model), ref_grads)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied

    out = model(input_ids=ids, labels=labels, num_items_in_batch=n_items)
    assert out.logits is None and rel_error(out.loss, ref_items.loss) <= TOL
    out.loss.backward()
    assert_same_grads(grads(model), ref_items_grads)
    out = model(input_ids=ids, labels=labels, shift_labels=custom_shift)
    assert out.logits is None and rel_error(out.loss, ref_shift) <= TOL


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_eval_generation_and_no_labels_are_unchanged(family):
    model = build(family)
    ids, labels = batch()
    model.eval()
    with torch.no_grad():
        ref_eval = model(input_ids=ids, labels=labels)
        ref_gen = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    model.train()
    ref_train_logits = model(input_ids=ids).logits.detach()
    signature = inspect.signature(model.forward)

    ct.patch(model)
    assert inspect.signature(model.forward) == signature  # what Trainer and generate inspect
    assert model.forward.__wrapped__ is type(model).forward
    assert torch.equal(model(input_ids=ids).logits, ref_train_logits)  # training, no labels
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        assert torch.equal(out.logits, ref_eval.logits) and torch.equal(out.loss, ref_eval.loss)
        assert torch.equal(model.generate(ids[:, :5], max_new_tokens=6, do_sample=False), ref_gen)

    ct.unpatch(model)
    assert not ct.is_patched(model) and "forward" not in model.__dict__
    model.train()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and torch.equal(out.logits, model(input_ids=ids).logits)


class WidestLogits(TorchDispatchMode):
    """Records the most rows of any V-wide tensor that an operator outputs (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == V:
                self.rows = max(self.rows, t.numel() // V)
        return out


def test_the_logits_are_never_built():
    model = build("gemma2")  # soft-capped: the cap would be applied to full logits
    model.train()
    ids, labels = batch()
    with WidestLogits() as plain:
        model(input_ids=ids, labels=labels).loss.backward()
    assert plain.rows == ids.numel()  # the model's own loss: (tokens, V) logits and more
    ct.patch(model)
    with WidestLogits() as patched:
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
    assert out.logits is None and patched.rows == 0  # the fused op is the only consumer of the classifier


def test_options_and_logging_statistics():
    model = build("llama")
    model.train()
    ids, labels = batch()
    logits = model(input_ids=ids).logits.detach()[:, :-1].reshape(-1, V).double()
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    c, eps = 1e-2, 0.1
    ce = F.cross_entropy(logits, target, label_smoothing=eps)
    lse = torch.logsumexp(logits[keep], dim=-1)
    z = c * (lse**2).mean()
    p = logits[keep].softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    accuracy = (logits[keep].argmax(-1) == target[keep]).double().mean()

    ct.patch(model, z_loss=c, label_smoothing=eps)
    out = model(input_ids=ids, labels=labels)
    stats = out.crossent
    assert isinstance(stats, ct.TrainingStats)
    assert rel_error(out.loss, ce + z) <= TOL
    assert rel_error(stats.ce, ce) <= TOL and rel_error(stats.z_loss, z) <= TOL
    assert rel_error(stats.entropy, entropy) <= TOL and float(stats.accuracy) == pytest.approx(float(accuracy))
    assert int(stats.n_tokens) == int(keep.sum()) and stats.aux.lse.shape == labels.shape
    assert not any(t.requires_grad for t in (stats.ce, stats.z_loss, stats.entropy, stats.accuracy))
    # labels given positionally (input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels)
    positional = model(ids, None, None, None, None, labels)
    assert positional.logits is None and torch.equal(positional.loss, out.loss)
    # the tuple form, as with return_dict=False: loss first, no logits
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss)
    assert not any(torch.is_tensor(t) and t.dim() == 3 for t in as_tuple)
    # patching again replaces the options; a deep copy is patched on its own
    ct.patch(model)
    assert float(model(input_ids=ids, labels=labels).crossent.z_loss) == 0.0
    with pytest.raises(ValueError, match="label_smoothing"):  # a failed re-patch keeps the patch in force
        ct.patch(model, label_smoothing=2.0)
    assert ct.is_patched(model) and model(input_ids=ids, labels=labels).logits is None
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin
    assert torch.equal(twin(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss)


def test_import_crossent_does_not_import_transformers():
    code = "import sys, crossent; assert 'transformers' not in sys.modules, 'imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------
# What is refused, and check=True
# --------------------------------------------------------------------------------------------


class LoraLikeLinear(nn.Module):
    """The structure of peft's LoRA ``Linear`` (base_layer, lora_A, lora_B), without peft."""

    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, base.out_features, bias=False)})

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class ModulesToSaveLike(nn.Module):
    """The structure of peft's ``ModulesToSaveWrapper``."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.original_module = base
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(base)})

    def forward(self, x):
        return self.modules_to_save["default"](x)


class Linear4bitLike(nn.Linear):
    """A quantised layer: an nn.Linear whose forward is its own (as bitsandbytes' Linear4bit)."""

    def forward(self, x):
        return super().forward(x)


class ScaledLlama(transformers.LlamaForCausalLM):
    """A family outside the allow-list that scales its logits in its forward."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = self.lm_head(outputs.last_hidden_state)
        logits = logits * 3.0
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_lora_modules_to_save_and_quantised_heads_are_refused():
    model = build("llama")
    base = model.lm_head
    model.lm_head = LoraLikeLinear(base)
    with pytest.raises(ValueError, match="LoRA-wrapped"):
        ct.patch(model)
    model.lm_head = ModulesToSaveLike(base)
    with pytest.raises(ValueError, match="modules_to_save"):
        ct.patch(model)
    model.lm_head = Linear4bitLike(32, V, bias=False)
    with pytest.raises(ValueError, match="overrides nn.Linear.forward"):
        ct.patch(model)
    model.lm_head = nn.Linear(32, V, bias=False)
    model.lm_head.weight = nn.Parameter(torch.zeros(V, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="quantised weight"):
        ct.patch(model)
    model.lm_head = base
    handle = base.register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(ValueError, match="forward hook"):
        ct.patch(model)
    handle.remove()
    assert not ct.is_patched(model)
    ct.patch(model)  # the plain head is accepted
    with pytest.raises(TypeError, match="ForCausalLM"):
        ct.patch(model.model)


def test_unknown_logit_scalings_are_refused_and_check_catches_a_mismatch():
    # a family outside the allow-list whose config carries a scaling attribute
    model = build("llama", logits_scaling=4.0)
    with pytest.raises(ValueError, match=r"logits_scaling=4\.0"):
        ct.patch(model)
    # a forward that scales its logits where crossent cannot see it from the config
    config = transformers.LlamaConfig(**COMMON, initializer_range=0.5)
    torch.manual_seed(0)
    scaled = ScaledLlama(config)
    with pytest.raises(ValueError, match=r"logits \* 3\.0"):
        ct.patch(scaled)
    # stating the transform explicitly is accepted, and check=True confirms it...
    ct.patch(scaled, logit_scale=3.0, check=True)
    ids, labels = batch()
    scaled.train()
    out = scaled(input_ids=ids, labels=labels)
    ct.unpatch(scaled)
    assert out.logits is None and rel_error(out.loss, scaled(input_ids=ids, labels=labels).loss) <= TOL
    # ...and refuses a wrong one, leaving the model unpatched
    with pytest.raises(ValueError, match="does not match the model's own"):
        ct.patch(scaled, logit_scale=2.0, check=True)
    assert not ct.is_patched(scaled)
    # bad options are refused by name
    with pytest.raises(ValueError, match="z_loss"):
        ct.patch(build("llama"), z_loss=-1.0)


def test_check_passes_on_the_allow_listed_families():
    for family in ("gemma2", "mixtral"):
        model = build(family)
        ct.patch(model, z_loss=1e-4, check=True)
        assert ct.is_patched(model) and model.training


# --------------------------------------------------------------------------------------------
# Trainer, with gradient accumulation
# --------------------------------------------------------------------------------------------


def _trainer_run(tmp_path: Path, patched: bool):
    from transformers import Trainer, TrainingArguments

    model = build("qwen2")
    if patched:
        ct.patch(model, z_loss=0.0)
    data = []
    for i in range(8):
        ids = torch.randint(3, V, (1, 12), generator=torch.Generator().manual_seed(10 + i))
        labels = ids.clone()
        labels[0, : 2 * (i % 4)] = -100  # different token counts per micro-batch: num_items_in_batch matters
        data.append({"input_ids": ids[0], "labels": labels[0]})
    seen = []
    model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((out.loss.detach(), kwargs.get("num_items_in_batch"), out.logits)),
        with_kwargs=True,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / ("patched" if patched else "plain")),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        # plain SGD: each update is the accumulated gradient itself, so comparing updates compares the
        # gradients (Adam divides each gradient by its own size and turns rounding noise of ~0 into ±lr)
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return seen, logged, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_with_gradient_accumulation(tmp_path):
    seen_ref, logged_ref, weights_ref = _trainer_run(tmp_path, patched=False)
    seen, logged, weights = _trainer_run(tmp_path, patched=True)
    assert len(seen) == len(seen_ref) == 4 and len(logged) == len(logged_ref) == 2
    for (loss, n_items, logits), (loss_ref, n_items_ref, _) in zip(seen, seen_ref, strict=True):
        assert n_items is not None and int(n_items) == int(n_items_ref)  # Trainer passed it
        assert logits is None
        assert rel_error(loss, loss_ref) <= TOL
    assert logged == pytest.approx(logged_ref, rel=TOL)
    initial = {n: p.detach() for n, p in build("qwen2").named_parameters()}
    for name, ref in weights_ref.items():
        assert not torch.equal(ref, initial[name])  # every weight trained
        assert rel_error(weights[name], ref) <= TOL, name
        assert rel_error(weights[name] - initial[name], ref - initial[name]) <= TOL, name  # and moved alike


# --------------------------------------------------------------------------------------------
# FSDP2 on two gloo ranks
# --------------------------------------------------------------------------------------------

FSDP_SCRIPT = r"""
import datetime
import sys

import torch


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 211, (4, 12), generator=generator)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[3, 7:] = -100
    return ids, labels


def main(rank, world, init_file, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import crossent.transformers

    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    model = crossent.transformers.patch(build())
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)  # the classifier is a unit of its own: its hooks must fire
    fully_shard(model, mesh=mesh)
    model.train()
    ids, labels = batch()
    n_items = (labels[:, 1:] != -100).sum()  # the global count, as Trainer passes it
    output = model(input_ids=ids[rank::world], labels=labels[rank::world], num_items_in_batch=n_items)
    assert output.logits is None
    (output.loss * world).backward()  # as Trainer does with average_tokens_across_devices
    loss = output.loss.detach().clone()
    dist.all_reduce(loss)
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
"""


def test_fsdp2_two_gloo_ranks_match_one_process(tmp_path):
    script = tmp_path / "fsdp_worker.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / "result.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), "2", str(tmp_path / "init"), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    result = torch.load(out)

    namespace: dict = {}
    exec(FSDP_SCRIPT, namespace)  # the same model and batch, in this process, unpatched
    model = namespace["build"]()
    model.train()
    ids, labels = namespace["batch"]()
    ref = model(input_ids=ids, labels=labels)
    ref.loss.backward()
    assert rel_error(result["loss"], ref.loss) <= TOL
    assert_same_grads(result["grads"], grads(model))


# --------------------------------------------------------------------------------------------
# The example
# --------------------------------------------------------------------------------------------


def test_example_smoke_run(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "examples" / "train_tiny_lm.py"), "--steps", "3", "--corpus-mb", "0.3"]
    result = subprocess.run(
        [*cmd, "--out", str(out), "--log-every", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = ["step", "loss_crossent", "loss_reference", "z_loss", "accuracy", "tokens_per_s", "peak_mem_mb"]
    assert list(rows[0].keys()) == columns and len(rows) == 3
    for row in rows:
        assert abs(float(row["loss_crossent"]) - float(row["loss_reference"])) <= 1e-3 * float(row["loss_reference"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
