"""Adapters between the reference state dict (``qsparse_dist/model/reference.py`` layout) and the
external formats — one module per format, each defining its mapping once, in both directions
(torchtitan's per-model ``state_dict_adapter``):

* :mod:`.hf` — Hugging Face tensors and ``config.json`` ⇄ reference tensors and ``ModelConfig``.
* :mod:`.megatron` — reference ⇄ megatron-core ``GPTModel`` shards per (TP, PP, EP) rank, and the
  global shard-file key naming with its inverse.

``export/`` and ``convert/`` read and write files; the name and layout rules live here."""
