"""Data pipeline: read documents (``datasets``), train/load a tokenizer (sentencepiece), pack token
ids into binary splits, and feed them as a deterministic, DP-sharded, resumable sample stream."""

from .dataset import SampleDataset, TokenFile, read_meta
from .prepare import FORMAT, prepare_data
from .sampler import StepSampler, eval_batches
from .sources import DataError, load_documents
from .tokenizer import Tokenizer, load_tokenizer, open_tokenizer

__all__ = ["DataError", "FORMAT", "SampleDataset", "StepSampler", "TokenFile", "Tokenizer", "eval_batches",
           "load_documents", "load_tokenizer", "open_tokenizer", "prepare_data", "read_meta"]
