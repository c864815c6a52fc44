"""2 ranks: each imported tiny HF model (``ROOT/<arch>/imp``, written by the test) is loaded into the
megatron GPT with ``load_imported_into_megatron`` at TP=1 (DP=2) and TP=2 (MoE: TP=2+SP, and EP=2),
and its full-vocab logits are compared with transformers' (``ROOT/<arch>/expected.pt``).  For Llama
it also runs a packed SFT row with the block-diagonal attention mask through megatron and compares
each example's logits with the example run alone (no cross-example leakage).

argv: ROOT ARCH[,ARCH...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist_utils import write_result  # noqa: E402

LAYOUTS = {"tp1": {"tp": 1}, "tp2": {"tp": 2}, "pp2": {"pp": 2}}
MOE_LAYOUTS = {"tp1": {"tp": 1}, "tp2_sp": {"tp": 2, "sp": True}, "ep2": {"tp": 1, "ep": 2}}


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def packed_leakage(model, expected: dict) -> tuple[float, float]:
    """Max |logits of an example inside a packed row − logits of the example alone|, with the
    block-diagonal mask and (as a control that the check can fail) with the plain causal mask."""
    from qsparse_dist.data.sft import packed_attention_mask
    from qsparse_dist.model.megatron.gpt import lm_forward

    row, doc = expected["packed_tokens"], expected["packed_doc_ids"]
    pos = torch.arange(row.shape[1])[None]
    with torch.no_grad():
        packed = gather_vocab(model(row, pos, packed_attention_mask(doc)))[0]
        causal = gather_vocab(lm_forward(model, row))[0]
        worst, control = 0.0, 0.0
        for k in range(int(doc.max()) + 1):
            sel = doc[0] == k
            alone = gather_vocab(lm_forward(model, row[:, sel]))[0]
            worst = max(worst, float((packed[sel] - alone).abs().max()))
            control = max(control, float((causal[sel] - alone).abs().max()))
    return worst, control


def main() -> None:
    dist.init_process_group("gloo")
    from qsparse_dist.config import config_from_dict
    from qsparse_dist.convert import load_imported
    from qsparse_dist.convert.megatron_load import load_imported_into_megatron
    from qsparse_dist.model.megatron.gpt import build_megatron_gpt, lm_forward
    from qsparse_dist.parallel import destroy_parallel, initialize_parallel

    root, archs = Path(sys.argv[1]), sys.argv[2].split(",")
    result: dict = {}
    for arch in archs:
        imp = root / arch / "imp"
        expected = torch.load(root / arch / "expected.pt", weights_only=True)
        base, _ = load_imported(imp)
        layouts = MOE_LAYOUTS if base.model.moe is not None else LAYOUTS
        for name, par in layouts.items():
            cfg = config_from_dict({**base.model_dump(mode="json"), "parallel": par,
                                    "checkpoint": {"init_from": str(imp)}})
            initialize_parallel(cfg.parallel, seed=1)
            try:
                model = build_megatron_gpt(cfg)
                load_imported_into_megatron(model, cfg)
                model.eval()
                if cfg.parallel.pp > 1:  # megatron's pipeline schedule; the loss lives on the last stage
                    from qsparse_dist.model.megatron.gpt import forward_backward

                    tokens, labels = expected["tokens"], expected["labels"]
                    with torch.no_grad():
                        losses = forward_backward(model, [(tokens, labels)], num_microbatches=1,
                                                  seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                                                  forward_only=True)
                    result[f"{arch}/{name}"] = {"loss": float(losses[0]) if losses else None}
                    continue
                with torch.no_grad():
                    logits = gather_vocab(lm_forward(model, expected["tokens"]))
                entry = {"max_diff": float((logits.double() - expected["logits"].double()).abs().max())}
                if "packed_tokens" in expected:
                    entry["packed_leakage"], entry["causal_mask_leakage"] = packed_leakage(model, expected)
                    from qsparse_dist.data.sft import megatron_sft_loss

                    with torch.no_grad():
                        entry["sft_loss"] = float(megatron_sft_loss(model, expected["sft_batch"]))
            except Exception as e:  # reported to the test, which decides
                entry = {"error": f"{type(e).__name__}: {e}"}
            finally:
                destroy_parallel()
            result[f"{arch}/{name}"] = entry
    write_result(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
