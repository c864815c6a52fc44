"""The megatron-core model: ``TransformerConfig`` from the run config and the GPT/MoE model (:mod:`.gpt`),
built from layer specs (:mod:`.specs`) whose linears are the Q-Sparse parallel linears of
:mod:`qsparse_dist.layers`."""
