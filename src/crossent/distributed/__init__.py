"""Losses across processes: a vocabulary split over tensor-parallel ranks, and exact normalisation.

Two problems of training across processes, solved on ``torch.distributed`` (NCCL on GPUs, gloo
on CPUs):

* **Vocabulary parallelism.** Each rank of a group holds an equal, contiguous slice of the
  classifier (Megatron's ``ColumnParallelLinear`` head): its logits are a vocabulary block of
  every token. :func:`vocab_parallel_cross_entropy` and :func:`vocab_parallel_linear_cross_entropy`
  compute the loss of the concatenated vocabulary without ever gathering it: each rank reduces
  its block to per-token statistics (DESIGN.md §1's ``(m, S)`` pair, the target score, the
  smoothing and entropy sums, the argmax), the ranks exchange those — two collectives of O(N)
  elements in the forward — and every rank then holds the exact global loss. The logits'
  backward needs no communication (the softmax of a block is ``exp((z - m) - log S)`` with the
  global pair); the linear form's backward all-reduces ``∂loss/∂hidden`` once.
* **Exact normalisation.** A mean over the tokens of a global batch split into micro-batches and
  data-parallel ranks is not a mean of per-micro-batch means. :func:`global_normalizer` gives the
  global denominator so that ``reduction="sum"`` divided by it is exact (the README's recipe).

Importing this module initialises nothing. With ``group=None`` the default process group is used;
when ``torch.distributed`` is not initialised at all, a call runs as a world of one process.
"""

from .losses import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from .normalizer import global_normalizer

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "global_normalizer"]
