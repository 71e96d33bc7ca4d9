"""The chunked pure-PyTorch backend: every device, a ``torch.library`` custom op per loss."""
