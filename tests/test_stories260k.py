"""stories260K from the offline data: the converted model reproduces the documented greedy text,
the fast tokenizer gives sentencepiece's exact ids, and a damaged data folder fails clearly."""

from __future__ import annotations

import random
import shutil
import uuid

import pytest
import sentencepiece
import torch
from transformers import AutoTokenizer

from experiments.models.loading import STORIES260K, load_stories260k
from experiments.data.offline import DEFAULT_DATA_ROOT, OfflineDataError, verify_files
from experiments.models.sp_tokenizer import SPACE, encode_characters

DOCUMENTED = "Once upon a time, there was a little girl named Lily"  # data/README.md
TOKENIZER_MODEL = DEFAULT_DATA_ROOT / STORIES260K[1]
TEXTS = [
    "Once upon a time",
    "Lily and Tim played in the park. They were happy!",
    "Digits: 12345, 3.14159 and -7; 1,000,000 $5 50% (x+y)*z",
    " one leading space",
    "   three leading, two  inner and trailing   ",
    "line one\nline two\n\n  indented line\tafter a tab\n",
    "\"Quotes\", 'apostrophes' — “curly” ‘ones’… naïve café",
    "unseen characters fall back to bytes: 日本語 🙂",
    "<s> and </s> are text here, not BOS/EOS",
    "205f3777-52b6-4270-9f67-c5125867d358",
    "",
    " ",
]


def random_uuids(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


@pytest.fixture(scope="module")
def stories():
    return load_stories260k()


@pytest.fixture(scope="module")
def sp():
    return sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER_MODEL))


def test_greedy_generation_reproduces_documented_text(stories):
    model, tok = stories
    input_ids = tok("Once upon a time", return_tensors="pt").input_ids  # (1, 5), BOS first
    assert input_ids[0, 0].item() == tok.bos_token_id == 1
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=20,
                             do_sample=False, pad_token_id=tok.pad_token_id)  # (1, 25)
    assert tok.decode(out[0], skip_special_tokens=True).startswith(DOCUMENTED)


def test_special_token_ids(stories):
    _, tok = stories
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 0, 0)
    assert len(tok) == 512


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_sentencepiece(stories, sp, text):
    _, tok = stories
    ids = sp.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok(text).input_ids == [tok.bos_token_id] + ids
    assert tok.decode(ids) == sp.decode(ids)


def test_ids_equal_sentencepiece_on_a_novel(stories, sp):
    _, tok = stories
    lines = (DEFAULT_DATA_ROOT / "text" / "botchan.txt").read_text(encoding="utf-8").splitlines()[:400]
    assert tok(lines, add_special_tokens=False).input_ids == sp.encode(lines)


def test_batch_padding_and_decoding(stories):
    _, tok = stories
    batch = tok(["Once upon a time", "Lily"], padding=True)
    assert batch.input_ids[1][-1] == tok.pad_token_id and batch.attention_mask[1][-1] == 0
    assert tok.batch_decode(batch.input_ids, skip_special_tokens=True) == ["Once upon a time", "Lily"]


def test_save_pretrained_round_trip(stories, tmp_path):
    _, tok = stories
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert [reloaded(t).input_ids for t in TEXTS] == [tok(t).input_ids for t in TEXTS]
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (1, 2, 0)


def test_bpe_merges_hex_characters_of_uuids(stories):
    # The vocabulary holds "ad", "ce", "ed", "▁a".."▁f" and "▁be", so plain encoding is not one
    # token per UUID character; these are the only merges seen in 200 random UUIDs. A UUID that
    # starts with a digit and avoids those pairs gets a lone dummy-prefix ▁ and single characters.
    _, tok = stories
    assert tok.tokenize("205f3777-52b6-4270-9f67-c5125867d358") == [SPACE] + list("205f3777-52b6-4270-9f67-c5125867d358")
    assert tok.tokenize("bed0ad5c-e5ce-4d1e-8f2a-0adced7be9f1") == [
        SPACE + "b", "ed", "0", "ad", "5", "c", "-", "e", "5", "ce", "-", "4", "d", "1", "e", "-",
        "8", "f", "2", "a", "-", "0", "ad", "c", "ed", "7", "b", "e", "9", "f", "1"]  # as sentencepiece
    seen = {p for u in random_uuids(200) for p in tok.tokenize(u) if len(p) > 1}
    assert seen <= {"ad", "ce", "ed", SPACE + "be"} | {SPACE + c for c in "abcdef"}


def test_encode_characters_round_trips_uuids(stories):
    _, tok = stories
    for text in random_uuids(200):
        ids = encode_characters(tok, text)
        assert len(ids) == len(text) + 1  # dummy-prefix ▁, then one piece per character
        assert tok.convert_ids_to_tokens(ids) == [SPACE] + list(text)
        assert tok.decode(ids) == text


def test_encode_characters_spaces_newlines_and_unknown(stories):
    _, tok = stories
    assert tok.convert_ids_to_tokens(encode_characters(tok, "a b\n")) == [SPACE, "a", SPACE, "b", "<0x0A>"]
    assert tok.convert_ids_to_tokens(encode_characters(tok, " x", add_prefix_space=False)) == [SPACE, "x"]
    assert tok.decode(encode_characters(tok, " ad be\nef")) == " ad be\nef"
    with pytest.raises(ValueError, match="single-character piece"):
        encode_characters(tok, "日")


@pytest.fixture
def copied_root(tmp_path):
    """A data root holding SHA256SUMS and an intact copy of the tokenizer model only."""
    shutil.copy(DEFAULT_DATA_ROOT / "SHA256SUMS", tmp_path / "SHA256SUMS")
    (tmp_path / STORIES260K[1]).parent.mkdir(parents=True)
    shutil.copy(TOKENIZER_MODEL, tmp_path / STORIES260K[1])
    return tmp_path


def test_verify_files_accepts_intact_copy(copied_root):
    assert verify_files(copied_root, [STORIES260K[1]]) == [copied_root.resolve() / STORIES260K[1]]


def test_altered_file_is_named_with_the_data_root(copied_root):
    path = copied_root / STORIES260K[1]
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(OfflineDataError, match=r"tok512\.model is altered") as err:
        verify_files(copied_root, [STORIES260K[1]])
    assert str(copied_root.resolve()) in str(err.value) and "data_root=" in str(err.value)


def test_missing_file_is_named_with_the_data_root(copied_root):
    with pytest.raises(OfflineDataError, match=r"stories260K\.bin is missing") as err:
        load_stories260k(copied_root)
    assert str(copied_root.resolve()) in str(err.value) and "data_root=" in str(err.value)


def test_unlisted_file_and_missing_sums_are_refused(copied_root, tmp_path_factory):
    with pytest.raises(OfflineDataError, match="not listed"):
        verify_files(copied_root, ["models/stories260K/extra.bin"])
    with pytest.raises(OfflineDataError, match="no SHA256SUMS"):
        verify_files(tmp_path_factory.mktemp("empty"), [STORIES260K[1]])
