"""A SentencePiece BPE ``.model`` as a Hugging Face fast tokenizer with sentencepiece's exact ids.

Why not a stock transformers path (checked against transformers 5.23 on the stories260K
``tok512.model``):

- ``LlamaTokenizer(vocab_file=...)`` ignores the file: a 3-token vocabulary that encodes every
  text to ``[]``, silently (the same trap as T5's ``vocab_file=``).
- ``LlamaTokenizer.from_pretrained(dir)`` (the file saved as ``tokenizer.model``) gets the merges
  right but not sentencepiece's ``remove_extra_whitespaces``: leading, trailing and repeated
  spaces give extra ``▁`` tokens.
- ``AutoTokenizer`` / ``PreTrainedTokenizerFast.from_pretrained(dir)`` omit the dummy prefix, so
  almost every text differs.
- ``convert_slow_tokenizer``'s ``LlamaConverter`` / ``SpmConverter`` raise on BPE models.

So the backend is built here from the model proto: sentencepiece's normalisation written as
``tokenizers`` normalizers, the vocabulary and score-ranked merges of its BPE, and Llama's decoder.
"""

from __future__ import annotations

from pathlib import Path

from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

SPACE = "▁"  # sentencepiece's visible space (U+2581); a piece starting with it starts a word
_BPE, _NORMAL = 2, 1  # ModelProto.TrainerSpec.ModelType.BPE, ModelProto.SentencePiece.Type.NORMAL


def read_proto(model_file: str | Path) -> sentencepiece_model_pb2.ModelProto:
    """The parsed SentencePiece model (vocabulary, scores, trainer and normaliser settings)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def _check_supported(proto: sentencepiece_model_pb2.ModelProto, model_file) -> None:
    """Refuse models whose settings the backend below does not reproduce exactly."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    problems = {
        "model_type is not BPE": trainer.model_type != _BPE,
        "a precompiled normalisation charsmap (non-identity normaliser)": bool(norm.precompiled_charsmap),
        "treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix,
        "add_dummy_prefix is off": not norm.add_dummy_prefix,
        "remove_extra_whitespaces is off": not norm.remove_extra_whitespaces,
        # Splitting words at ▁ before BPE (for speed) is exact only if no piece has ▁ inside.
        f"a piece with {SPACE} after its first character": any(SPACE in p.piece[1:] for p in proto.pieces),
    }
    found = [name for name, bad in problems.items() if bad]
    if found:
        raise ValueError(f"{model_file}: unsupported SentencePiece settings: {', '.join(found)}")


def bpe_merges(proto: sentencepiece_model_pb2.ModelProto) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two pieces, best piece score first.

    SentencePiece BPE repeatedly joins the adjacent pair whose concatenation is the
    highest-scoring piece; ranking all splits of each piece by that piece's score gives
    ``tokenizers``' BPE the same order.
    """
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    ranked = [(-p.score, vocab[p.piece], k, (p.piece[:k], p.piece[k:]))
              for p in proto.pieces if p.type == _NORMAL
              for k in range(1, len(p.piece)) if p.piece[:k] in vocab and p.piece[k:] in vocab]
    return [pair for *_, pair in sorted(ranked)]


def _normalizer() -> normalizers.Normalizer:
    """SentencePiece's identity normaliser with ``remove_extra_whitespaces`` and the dummy prefix.

    Only ASCII spaces count as whitespace there (newlines and tabs stay). ``\\A``/``\\z`` and not
    ``^``/``$``: the Oniguruma regexes of ``tokenizers`` read ``^``/``$`` as line anchors.
    """
    return normalizers.Sequence([
        normalizers.Replace(Regex(r"\A +"), ""),        # drop leading spaces
        normalizers.Replace(Regex(r" {2,}"), " "),      # collapse runs of spaces
        normalizers.Prepend(SPACE),                     # dummy prefix (not added to an empty text)
        normalizers.Replace(" ", SPACE),
        normalizers.Replace(Regex(SPACE + r"+\z"), ""),  # drop trailing spaces, escaped ones too
    ])


def _backend(proto: sentencepiece_model_pb2.ModelProto) -> Tokenizer:
    """The ``tokenizers`` pipeline: normaliser → split before each ▁ → BPE → Llama's decoder."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    model = BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=proto.trainer_spec.unk_piece,
                fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback)
    backend = Tokenizer(model)
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    # ▁ back to spaces, byte pieces <0xNN> back to UTF-8, then drop the dummy prefix's space.
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    return backend


def load_sentencepiece_tokenizer(model_file: str | Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose ``encode(text, add_special_tokens=False)`` equals sentencepiece's ids.

    With special tokens (the default) BOS is prepended, as llama2.c and LLaMA do; EOS is not.
    Text such as ``"<s>"`` is tokenised as characters, not as BOS, as sentencepiece does.
    """
    proto = read_proto(model_file)
    _check_supported(proto, model_file)
    spec = proto.trainer_spec
    # A vocabulary trained with pad_id = -1 has no pad piece. Batching needs one, so padding uses
    # <unk> (id 0): padded positions are masked by attention_mask and dropped from the loss, and a
    # new token would need an embedding row the pretrained model does not have.
    pad = spec.pad_piece if spec.pad_id >= 0 else spec.unk_piece
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(proto), bos_token=spec.bos_piece, eos_token=spec.eos_piece,
        unk_token=spec.unk_piece, pad_token=pad, add_bos_token=True, add_eos_token=False,
        split_special_tokens=True, clean_up_tokenization_spaces=False)


def encode_characters(tokenizer: PreTrainedTokenizerFast, text: str, add_prefix_space: bool = True) -> list[int]:
    """One token per character of ``text``, with none of BPE's merges (e.g. for UUID digits).

    A space becomes the ``▁`` piece. ``add_prefix_space`` first emits a lone ``▁`` for
    sentencepiece's dummy prefix; ``tokenizer.decode`` drops exactly one leading space (sentencepiece's
    own decode drops them all), so keep it on for ``decode(encode_characters(text)) == text``; turn
    it off for a continuation whose own spaces are in ``text``. A character without its own piece takes its byte piece ``<0xNN>`` if
    it is one UTF-8 byte (newline, tab); otherwise it cannot be one token and raises ValueError.
    """
    vocab = tokenizer.get_vocab()
    pieces = [SPACE if c == " " else c for c in text]
    pieces = [SPACE] + pieces if add_prefix_space else pieces
    ids = []
    for piece in pieces:
        byte_piece = f"<0x{ord(piece):02X}>" if ord(piece) < 0x80 else None
        token_id = vocab.get(piece, vocab.get(byte_piece))
        if token_id is None:
            raise ValueError(f"{piece!r} has no single-character piece in this vocabulary")
        ids.append(token_id)
    return ids
