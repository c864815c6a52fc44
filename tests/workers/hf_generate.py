"""Worker for tests/test_export_generate.py: greedy decoding of HF exports with whatever transformers is
first on ``PYTHONPATH`` (the venv's, or the oldest supported one installed with ``pip --target``).

Usage: ``python hf_generate.py SPEC.json`` where SPEC is ``{"models": {name: dir}, "prompts": [[ids]],
"new_tokens": N}``.  Prints one JSON object: ``{"transformers": version, "results": {name: {"arch":
class name, "generate": [[ids]], "argmax": [[ids]], "padded": [[ids]], "alone": [[ids]]}}}`` where ``generate``
is ``model.generate(..., use_cache=True, do_sample=False)``, ``argmax`` re-runs the whole sequence
without a cache for every new token, ``padded`` decodes a batch whose first row is shortened by two
tokens and left-padded, and ``alone`` is what those two rows give one at a time.  Imports only torch and transformers (never qsparse_dist), so the version under test is the
only transformers involved.
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM


def _load(path: str):
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = "dtype" if major >= 5 else "torch_dtype"  # renamed in transformers 5
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **{dtype_kw: torch.float32})
    return model.eval()


def _argmax_without_cache(model, prompts: torch.Tensor, n: int) -> list[list[int]]:
    seq = prompts
    for _ in range(n):
        logits = model(seq, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompts.shape[1]:].tolist()


def main(spec_path: str) -> None:
    torch.set_num_threads(1)  # tiny models: more threads only add synchronisation overhead
    spec = json.loads(open(spec_path, encoding="utf-8").read())
    prompts = torch.tensor(spec["prompts"])
    n = int(spec["new_tokens"])
    results = {}
    with torch.no_grad():
        for name, path in spec["models"].items():
            model = _load(path)
            kw = dict(max_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
            # row 0 shortened by 2 tokens and left-padded: must decode as it does alone
            short = prompts[0, 2:]
            batch = torch.stack([torch.cat([torch.zeros(2, dtype=prompts.dtype), short]), prompts[1]])
            mask = torch.ones_like(batch)
            mask[0, :2] = 0
            padded = model.generate(batch, attention_mask=mask, **kw)[:, batch.shape[1]:]
            alone = model.generate(short[None], attention_mask=torch.ones_like(short[None]), **kw)[0, len(short):]
            results[name] = {
                "arch": type(model).__name__,
                "generate": out[:, prompts.shape[1]:].tolist(),
                "argmax": _argmax_without_cache(model, prompts, n),
                "padded": padded.tolist(),
                "alone": [alone.tolist(), out[1, prompts.shape[1]:].tolist()],
            }
    print(json.dumps({"transformers": transformers.__version__, "results": results}))


if __name__ == "__main__":
    main(sys.argv[1])
