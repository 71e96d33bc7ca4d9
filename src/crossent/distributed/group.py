"""The process group a vocabulary is split over, and this rank's shard of it."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from ..core.chunks import Shard
from ..validation import is_dtensor


def group_of(group) -> tuple[object, int, int]:
    """(group, rank in it, its size); a world of one when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                "group was given but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group first (or pass group=None for one process)"
            )
        return None, 0, 1
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of group")
    return group, rank, world


def check_vocab_size(vocab_size, world: int, local: int) -> int:
    """The real vocabulary size: ``vocab_size`` checked against the shards, or ``world·local``."""
    padded = world * local
    if vocab_size is None:
        return padded
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int (the real vocabulary size) or None, got {vocab_size!r}")
    if not 1 <= vocab_size <= padded:
        raise ValueError(
            f"vocab_size must be in [1, {padded}]: the real vocabulary, at most the {world} rank(s) × {local} "
            f"columns of the shards, got {vocab_size}"
        )
    return vocab_size


def shard_of(group, vocab_size, local: int) -> Shard:
    """This rank's :class:`~crossent.core.chunks.Shard` of a vocabulary split over ``group``."""
    group, rank, world = group_of(group)
    return Shard(group, rank, world, local, check_vocab_size(vocab_size, world, local))


def reject_dtensor(name: str, t: Tensor) -> None:
    if is_dtensor(t):
        raise TypeError(
            f"{name} is a DTensor; the vocabulary-parallel losses take this rank's plain local shard: "
            f"pass {name}.to_local() (an equal, contiguous slice per rank) and group=<the mesh dimension's "
            "process group>"
        )


def check_impl(impl: str) -> None:
    if impl == "triton":
        raise ValueError(
            'impl="triton" is not available for the vocabulary-parallel losses yet; use impl="auto" or "torch" '
            "(each rank's block is computed by the chunked PyTorch backend)"
        )
