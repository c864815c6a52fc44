"""qsparse-dist: training system for fully sparsely-activated LLMs (Q-Sparse, BitNet b1.58, MoE)."""

__version__ = "0.1.0"
