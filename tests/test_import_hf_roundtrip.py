"""import-hf → continue-train with Q-Sparse on 2 processes (TP=2, ZeRO-1, sparsity ramp) → export to
Hugging Face → reload with transformers: the first step's loss is the imported dense model's loss,
the ramp reaches the targets, and the exported model reproduces the trained checkpoint's logits.
In the same processes, an SFT run (packed chat data, prompt-masked loss) starts from the same import
and its first loss equals transformers' loss-masked loss on the same rows, example by example."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from import_hf_tiny import build_hf_model, build_tiny_tokenizer  # noqa: E402

from tests.corpus import corpus_text, write_corpus  # noqa: E402

SEQ, MICRO, STEPS, RAMP, SFT_SEQ = 32, 4, 3, 2, 64
TARGET = {"qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.625}


def _prepare_sft_data(tokenizer_dir: Path, out: Path) -> Path:
    """Prompt/response pairs from consecutive corpus lines, packed into rows of SFT_SEQ."""
    from qsparse_dist.data.sft import prepare_sft

    lines = [x.strip() for x in corpus_text().splitlines()[:400] if x.strip()][:80]
    jsonl = out.parent / "sft.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": a, "response": b}) for a, b in zip(lines[::2], lines[1::2])))
    meta = prepare_sft([jsonl], str(tokenizer_dir), out, seq_length=SFT_SEQ)
    assert meta["splits"]["train"]["rows"] >= MICRO
    return out


@pytest.mark.dist
@pytest.mark.slow
def test_import_continue_train_export_reload(tmp_path):
    from qsparse_dist.convert import import_hf
    from qsparse_dist.data import SampleDataset, StepSampler, TokenFile, prepare_data
    from tests.dist_utils import torchrun

    hf = build_hf_model("llama", tmp_path / "hf", seed=3)
    build_tiny_tokenizer(tmp_path / "hf", write_corpus(tmp_path / "tok_corpus.txt"))
    imp = tmp_path / "imp"
    import_hf(tmp_path / "hf", imp, overrides=[
        "sparsity.linear=qsparse", *(f"sparsity.{k}={v}" for k, v in TARGET.items()), f"sparsity.ramp_steps={RAMP}"])
    write_corpus(tmp_path / "corpus.txt", 20_000)
    prepare_data([str(tmp_path / "corpus.txt")], tmp_path / "data", tokenizer=str(imp / "tokenizer"),
                 valid_fraction=0.0, log=lambda *a: None)
    sft_dir = _prepare_sft_data(imp / "tokenizer", tmp_path / "sft")
    run = tmp_path / "run"
    overrides = [f"checkpoint.init_from={imp}", f"data.path={tmp_path / 'data'}", "parallel.tp=2",
                 "parallel.zero_stage=1", f"model.seq_length={SEQ}", f"data.micro_batch_size={MICRO}",
                 f"train.steps={STEPS}", f"train.run_dir={run}", "logging.progress_bar=false",
                 "logging.tensorboard=false", "optimizer.lr=2e-3", "schedule.kind=constant"]
    sft_overrides = [f"checkpoint.init_from={imp}", f"data.path={sft_dir}", "parallel.tp=2", "parallel.zero_stage=1",
                     f"model.seq_length={SFT_SEQ}", f"data.micro_batch_size={MICRO}", "train.steps=2",
                     f"train.run_dir={tmp_path / 'sft_run'}", "logging.progress_bar=false",
                     "logging.tensorboard=false", "schedule.kind=constant"]
    res = torchrun("import_train.py", 2, tmp_path / "out",
                   [imp / "config.yaml", *overrides, "--next", imp / "config.yaml", *sft_overrides], timeout=600)
    runs = res[0]["runs"]
    assert runs[0]["steps"] == STEPS and runs[0]["resumed_from"] is None and runs[1]["steps"] == 2

    # SFT: step 1 (dense, ramp 0) = transformers' loss-masked loss on the same packed rows
    from qsparse_dist.data.sft import SFTDataset

    sft_rec = json.loads((tmp_path / "sft_run" / "metrics.jsonl").read_text().splitlines()[0])
    sft_ds = SFTDataset(sft_dir, with_attention_mask=False)
    rows = [sft_ds[i] for i in StepSampler(len(sft_ds), MICRO, MICRO, 1, 0, 1234).step(0)[0]]
    num = den = 0.0
    with torch.no_grad():
        for r in rows:
            for k in range(int(r["doc_ids"].max()) + 1):
                sel = r["doc_ids"] == k
                lg = hf(r["tokens"][sel][None]).logits[0]
                ce = torch.nn.functional.cross_entropy(lg, r["labels"][sel], reduction="none")
                num += float((ce * r["loss_mask"][sel]).sum())
                den += float(r["loss_mask"][sel].sum())
    # the trainer averages per micro-batch means; one micro-batch per step here
    print(f"SFT step-1 loss {sft_rec['loss']:.6f} vs transformers {num / den:.6f}")
    assert abs(sft_rec["loss"] - num / den) <= 1e-4, (sft_rec["loss"], num / den)

    # step 1 runs dense (ramp fraction 0) on the imported weights: its loss is transformers' loss
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert [r["sparsity_ramp"] for r in recs] == [0.0, 0.5, 1.0]
    sampler = StepSampler(TokenFile(tmp_path / "data", "train").num_samples(SEQ), MICRO, MICRO, 1, 0, 1234)
    ds = SampleDataset(TokenFile(tmp_path / "data", "train"), SEQ)
    batch = torch.stack([ds[i] for i in sampler.step(0)[0]])
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    print(f"continue-train step-1 loss {recs[0]['loss']:.6f} vs transformers {hf_loss:.6f}")
    assert abs(recs[0]["loss"] - hf_loss) <= 1e-4, (recs[0]["loss"], hf_loss)
    last = recs[-1]["sparsity_layers"]
    for key, frac in last.items():
        proj = key.rsplit(".", 1)[1]
        assert frac == pytest.approx(TARGET[proj], abs=0.02), (key, frac)

    # export → reload with transformers → logits equal the trained checkpoint's reference model
    from transformers import AutoModelForCausalLM

    from qsparse_dist.export import export_hf, load_checkpoint
    from qsparse_dist.model.reference import QSparseGPT

    ckpt = load_checkpoint(run)
    assert ckpt.config.sparsity.linear == "qsparse" and ckpt.config.sparsity.down == TARGET["down"]
    from qsparse_dist.convert import load_imported

    _, imported = load_imported(imp)
    moved = max((ckpt.state_dict[k].float() - imported[k].float()).abs().max().item() for k in imported)
    assert moved > 1e-4, "training did not change the imported weights"
    export_hf(ckpt, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True,
                                                    dtype=torch.float32).eval()
    ref = QSparseGPT(ckpt.config.model, ckpt.config.sparsity).eval()
    ref.load_state_dict(ckpt.state_dict)
    toks = batch[:, :-1]
    with torch.no_grad():
        diff = (reloaded(toks).logits - ref(toks)).abs().max().item()
    print(f"exported (transformers, remote code) vs trained reference logits: max |diff| {diff:.3e}; "
          f"final sparsity {last}")
    assert diff <= 1e-4, f"exported vs trained logits: {diff}"
    # the original tokenizer (and its chat template) travels import → data → checkpoint → export
    from transformers import AutoTokenizer

    orig, exported = AutoTokenizer.from_pretrained(imp / "tokenizer"), AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "Who goes there? A friend to this ground."
    assert exported.encode(text) == orig.encode(text) and exported.chat_template == orig.chat_template
