"""The run's SentencePiece model as a Hugging Face (``tokenizers``-backed) tokenizer that
``AutoTokenizer`` loads offline and that encodes exactly like SentencePiece.

The pipeline is rebuilt from the model's own ``normalizer_spec`` / ``trainer_spec`` rather than taken
from a generic converter, because the generic Llama conversion ignores SentencePiece's normalization
rule and whitespace options (it would tokenize differently from training for e.g. ``nmt_nfkc`` models):

    normalizer  = [Precompiled(charsmap)] + [strip, collapse "  +" → " "]   (remove_extra_whitespaces)
                  + [Prepend("▁")] (add_dummy_prefix) + [" " → "▁"]
    pre-tokens  = split before each "▁" — before each run of "▁" with allow_whitespace_only_pieces —
                  (split_by_whitespace) + single digits (split_digits)
    model       = BPE with the SentencePiece vocabulary, merges ranked by piece score, byte fallback
    decoder     = "▁" → " ", byte fallback, fuse, strip one leading space (add_dummy_prefix)

Only BPE SentencePiece models are converted (what ``prepare-data`` trains); a unigram model is
refused with a clear error.  :func:`sentencepiece_vocab` gives the token list / scores / types for GGUF.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ExportError

__all__ = ["hf_tokenizer_from_sentencepiece", "sentencepiece_vocab", "SpVocab"]


def _load_proto(model_file: str | Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as e:  # protobuf raises DecodeError (message varies by backend)
        raise ExportError(f"{model_file}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise ExportError(f"{model_file}: not a SentencePiece model (no pieces)")
    return proto


class SpVocab:
    """Pieces, scores and kinds of a SentencePiece model plus its special ids (``-1`` = none)."""

    def __init__(self, model_file: str | Path) -> None:
        proto = _load_proto(model_file)
        self.proto = proto
        t = proto.trainer_spec
        self.model_type = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(t.model_type, str(t.model_type))
        self.pieces = [p.piece for p in proto.pieces]
        self.scores = [p.score for p in proto.pieces]
        self.types = [p.type for p in proto.pieces]  # 1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = t.bos_id, t.eos_id, t.unk_id, t.pad_id

    def piece(self, i: int) -> str | None:
        return self.pieces[i] if 0 <= i < len(self.pieces) else None


def sentencepiece_vocab(model_file: str | Path) -> SpVocab:
    return SpVocab(model_file)


def _bpe_merges(vocab: dict[str, int], pieces: list[str], scores: list[float], skip: set[int]) -> list[tuple[str, str]]:
    """Every split ``piece = a + b`` with both halves in the vocabulary, ranked by the score of the
    merged piece (then by the ids of the halves): the order SentencePiece's BPE applies merges in."""
    ranked = []
    for pid, piece in enumerate(pieces):
        if pid in skip or len(piece) < 2:
            continue
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in vocab and b in vocab and vocab[a] not in skip and vocab[b] not in skip:
                ranked.append((-scores[pid], pid, vocab[a], vocab[b], a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def hf_tokenizer_from_sentencepiece(model_file: str | Path, *, add_bos_token: bool = False):
    """A ``PreTrainedTokenizerFast`` equivalent to the SentencePiece model (see the module doc)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    sv = SpVocab(model_file)
    if sv.model_type != "bpe":
        raise ExportError(f"{model_file}: SentencePiece model type {sv.model_type!r} is not supported (BPE only)")
    proto = sv.proto
    norm, t = proto.normalizer_spec, proto.trainer_spec
    vocab = {p: i for i, p in enumerate(sv.pieces)}
    control = {i for i, ty in enumerate(sv.types) if ty in (2, 3, 6)}  # unk/control/byte pieces never merge
    merges = _bpe_merges(vocab, sv.pieces, sv.scores, control)
    unk = sv.piece(sv.unk_id)
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=t.byte_fallback))

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", "▁"))
    tk.normalizer = normalizers.Sequence(steps)
    pre = []
    if t.split_by_whitespace:  # SentencePiece's SplitIntoWords: a word starts at "▁" (at a run of them
        # when whitespace-only pieces are allowed)
        if t.allow_whitespace_only_pieces:
            pre.append(pre_tokenizers.Split(Regex("▁+[^▁]*"), behavior="isolated"))
        else:
            pre.append(pre_tokenizers.Split("▁", behavior="merged_with_next"))
    if t.split_digits:
        pre.append(pre_tokenizers.Digits(individual_digits=True))
    if pre:
        tk.pre_tokenizer = pre_tokenizers.Sequence(pre)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tk.decoder = decoders.Sequence(dec)

    specials = {}
    for name, idx in (("bos_token", sv.bos_id), ("eos_token", sv.eos_id), ("unk_token", sv.unk_id), ("pad_token", sv.pad_id)):
        if sv.piece(idx) is not None:
            specials[name] = sv.piece(idx)
    if "bos_token" in specials and add_bos_token:
        from tokenizers.processors import TemplateProcessing

        b = specials["bos_token"]
        tk.post_processor = TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, sv.bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False, **specials)
    return tok
