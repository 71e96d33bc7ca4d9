"""A tiny GPT trained with a vocabulary-parallel head, nanoGPT style, on the CPU.

    torchrun --nproc_per_node 2 examples/tensor_parallel.py

(or ``python examples/tensor_parallel.py`` for one process). Every rank holds the whole (tiny)
transformer and sees the same batch; the classifier is split by vocabulary rows, as Megatron's
column-parallel head is: rank r owns rows [r·V/P, (r+1)·V/P) of the (padded) vocabulary, and
``crossent.distributed.vocab_parallel_linear_cross_entropy`` computes the exact cross entropy of
the whole vocabulary without any rank ever holding all the logits. Its backward all-reduces the
gradient of the hidden states, so the replicated trunk gets identical gradients on every rank and
stays in sync without DDP. The vocabulary (the characters of a short text) is padded to a
multiple of 8·P; ``vocab_size=`` masks the padding. The head is initialised from one full matrix
and sliced, so the losses printed do not depend on the number of ranks.
"""

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from crossent.distributed import vocab_parallel_linear_cross_entropy

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
    "First Citizen: You are all resolved rather to die than to famish? All: Resolved. resolved. "
    "First Citizen: First, you know Caius Marcius is chief enemy to the people. "
    "All: We know't, we know't. First Citizen: Let us kill him, and we'll have corn at our own price. "
)


@dataclass
class Config:
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 48
    batch_size: int = 8
    steps: int = 60
    lr: float = 3e-3
    z_loss: float = 1e-4
    seed: int = 1337


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = nn.MultiheadAttention(cfg.n_embd, cfg.n_head, batch_first=True)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        d = cfg.n_embd
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        T = x.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Trunk(nn.Module):
    """Everything but the classifier: replicated on every rank."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def main():
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    cfg = Config()

    chars = sorted(set(TEXT))
    vocab_size = len(chars)  # the real vocabulary
    padded = math.ceil(vocab_size / (8 * world)) * 8 * world
    local = padded // world  # vocabulary rows per rank
    data = torch.tensor([chars.index(c) for c in TEXT])

    torch.manual_seed(cfg.seed)  # the same trunk and the same full head on every rank
    trunk = Trunk(cfg, vocab_size)
    full_head = torch.randn(padded, cfg.n_embd) * 0.02
    head_shard = nn.Parameter(full_head[rank * local : (rank + 1) * local].clone())
    optimizer = torch.optim.AdamW([*trunk.parameters(), head_shard], lr=cfg.lr, weight_decay=0.1)
    batches = torch.Generator().manual_seed(cfg.seed)  # every rank draws the same batches
    if rank == 0:
        print(f"vocabulary {vocab_size} padded to {padded}: {local} rows on each of {world} rank(s)")

    t0 = time.time()
    for step in range(cfg.steps + 1):
        starts = torch.randint(len(data) - cfg.block_size - 1, (cfg.batch_size,), generator=batches)
        x = torch.stack([data[s : s + cfg.block_size] for s in starts])
        y = torch.stack([data[s + 1 : s + 1 + cfg.block_size] for s in starts])
        hidden = trunk(x)
        loss = vocab_parallel_linear_cross_entropy(hidden, head_shard, y, vocab_size=vocab_size, z_loss=cfg.z_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # one all-reduce: the gradient of `hidden`
        optimizer.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d}: loss {loss.item():.4f}  ({time.time() - t0:.1f}s)")

    if distributed:  # the replicated trunk never drifted apart: compare with rank 0's copy
        flat = torch.cat([p.detach().reshape(-1) for p in trunk.parameters()])
        first = flat.clone()
        dist.broadcast(first, src=0)
        same = torch.tensor(float(torch.equal(flat, first)))
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if rank == 0:
            print(f"trunk replicas identical on all ranks: {bool(same)}")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
