"""The one core every loss runs on.

* :mod:`.rows` and :mod:`.online` — the per-chunk math of DESIGN.md §1 (whole rows; vocabulary
  blocks merged online);
* :mod:`.chunks` — how a call is cut into chunks (row blocks, chunk sizes, the vocabulary shard);
* :mod:`.cross_entropy` and :mod:`.linear` — the chunk loops (row chunks of logits; token or
  vocabulary chunks of a fused classifier), each optionally over a vocabulary shard;
* :mod:`.config` and :mod:`.autograd` — the per-call state and the one ``torch.library`` /
  autograd layer, which dispatches to a backend's kernels.
"""
