"""Tiny random Hugging Face checkpoints built locally with transformers' config classes (no
downloads), shared by the import tests and their multi-process workers."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "mistral", "mixtral")
VOCAB = 96


def hf_config(arch: str, **over):
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=5000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(**{**common, **over})
    if arch == "qwen2":  # tied embeddings like Qwen2-0.5B; QKV biases are always on
        return Qwen2Config(**{**common, "tie_word_embeddings": True, **over})
    if arch == "mistral":
        return MistralConfig(**{**common, "sliding_window": 64, **over})
    if arch == "mixtral":
        return MixtralConfig(**{**common, "num_local_experts": 4, "num_experts_per_tok": 2, **over})
    raise ValueError(arch)


def build_hf_model(arch: str, out_dir: str | Path, seed: int = 0, **over):
    """A random transformers model saved with ``save_pretrained`` (safetensors).  Every parameter,
    biases and norm weights included, is randomized so that a wrong mapping cannot pass."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **over), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.eval()
    model.save_pretrained(out_dir)
    return model


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(out_dir: str | Path, corpus: str | Path, vocab_size: int = VOCAB,
                         chat_template: bool = True):
    """A small BPE tokenizer trained on the first 40 kB of ``corpus`` (ids 0..5 are
    ``<pad> <s> </s> <unk> <|im_start|> <|im_end|>``), saved as a transformers fast tokenizer,
    optionally with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = Path(corpus).read_text(encoding="utf-8")[:40_000]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tk.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=["\n"])
    tk.train_from_iterator(text.split("\n\n"), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    if chat_template:
        tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return tok
