"""SentencePiece training with the challenge's settings, loading checks and bpb byte accounting."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch

from pgolf.data.corpus import CorpusError
from pgolf.data.tokenizer import (
    TRAINER_SETTINGS,
    ByteCheck,
    TokenizerError,
    byte_tables,
    count_bytes,
    document_byte_counts,
    load_tokenizer,
    model_settings,
    train_tokenizer,
    training_texts,
)


@pytest.fixture(scope="module")
def sp8192(shared_dir):
    return load_tokenizer(shared_dir / "tokenizers" / "fineweb_8192_bpe.model", 8192)


@pytest.fixture(scope="module")
def sample_docs(shared_dir):
    with open(shared_dir / "fineweb" / "docs_sample.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


@pytest.fixture(scope="module")
def trained_512(tmp_path_factory, sample_docs):
    path = tmp_path_factory.mktemp("tok") / "sp512.model"
    path.write_bytes(train_tokenizer(training_texts(sample_docs, max_docs=150), 512))
    return path


def test_golden_validation_byte_count(golden, golden_tokenizer):
    vocab_size = golden["config"]["VOCAB_SIZE"]  # compact set: sp1024 (no byte fallback: <unk> ids too)
    tables = byte_tables(load_tokenizer(golden_tokenizer, vocab_size), vocab_size)
    tokens = golden["val_tokens"]  # [N]
    per_token = count_bytes(tokens[:-1], tokens[1:], tables)
    assert int(per_token.sum()) == golden["val_byte_count"]


def test_byte_tables_follow_the_reference_rules(sp8192):
    tables = byte_tables(sp8192, 8192)
    space = sp8192.piece_to_id("\u2581")
    assert tables.base_bytes[space] == 0 and tables.has_leading_space[space]
    for control in (0, 1, 2, 3):  # pad, bos, eos, unk
        assert tables.is_boundary[control] and tables.base_bytes[control] == 0
    byte_piece = sp8192.piece_to_id("<0xC4>")
    assert sp8192.is_byte(byte_piece) and tables.base_bytes[byte_piece] == 1
    the = sp8192.piece_to_id("\u2581the")
    assert tables.base_bytes[the] == 3 and tables.has_leading_space[the] and not tables.is_boundary[the]
    # After BOS (a boundary) a leading "▁" adds no byte; after a word it does.
    assert count_bytes(torch.tensor([1, the]), torch.tensor([the, the]), tables).tolist() == [3, 4]


def test_tables_cover_a_vocab_larger_than_the_tokenizer(sp8192):
    tables = byte_tables(sp8192, 8200)
    assert tables.base_bytes.shape == (8200,) and tables.is_boundary[8192:].all()


def test_table_bytes_equal_decoded_bytes_on_every_sample_document(sp8192, sample_docs):
    encoded = sp8192.encode(sample_docs, out_type=int)
    table, decoded = document_byte_counts(sp8192, byte_tables(sp8192, 8192), encoded, num_threads=2)
    assert table == decoded and len(table) == 150
    # Decoded text is the normalised text: same bytes as the raw text except where NFKC changed it.
    raw = [len(text.encode("utf-8")) for text in sample_docs]
    assert sum(raw) >= sum(decoded) > 0.99 * sum(raw)


def test_byte_check_refuses_a_tokenizer_that_miscounts(shared_dir, sample_docs):
    # The 1024-piece model has no byte fallback: characters it does not know
    # become <unk> (0 bytes in the tables) but decode to " ⁇ ".
    path = shared_dir / "tokenizers" / "fineweb_1024_bpe.model"
    sp = load_tokenizer(path, 1024)
    check = ByteCheck(sp, byte_tables(sp, 1024), path, num_threads=2)
    with pytest.raises(TokenizerError, match=r"fineweb_1024_bpe.model: validation document 1: the byte tables count"):
        check.add(sp.encode(sample_docs[:5], out_type=int))


def test_byte_check_accumulates_totals(sp8192, sample_docs):
    check = ByteCheck(sp8192, byte_tables(sp8192, 8192), "sp8192", num_threads=2)
    check.add(sp8192.encode(sample_docs[:3], out_type=int))
    check.add([])
    summary = check.summary()
    assert summary["documents"] == 3 and summary["agree"]
    assert summary["table_bytes"] == summary["decoded_bytes"] == sum(
        len(sp8192.decode(ids).encode("utf-8")) for ids in sp8192.encode(sample_docs[:3], out_type=int)
    )


def test_training_texts_follow_the_challenge_selection():
    docs = ["  a\x00b  ", "", " \n ", "c", "d"]
    assert list(training_texts(docs, max_docs=4)) == ["a b", "c"]  # the limit counts skipped documents too


def test_trained_tokenizer_carries_the_challenge_settings(trained_512):
    settings = model_settings(trained_512)
    assert settings == {**TRAINER_SETTINGS, "vocab_size": 512}
    sp = spm.SentencePieceProcessor(model_file=str(trained_512))
    assert sp.vocab_size() == 512
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    # The settings show in behaviour too: no dummy prefix, digits split, bytes as fallback.
    pieces = sp.encode("Hello 2024 \u4e16", out_type=str)
    assert not pieces[0].startswith("\u2581")
    assert [p for p in pieces if p.isdigit()] == ["2", "0", "2", "4"]
    assert all(sp.is_byte(sp.piece_to_id(p)) for p in pieces[-3:])  # "世" is 3 UTF-8 bytes


def test_training_is_deterministic(trained_512, sample_docs):
    assert train_tokenizer(training_texts(sample_docs, max_docs=150), 512) == trained_512.read_bytes()


def test_model_settings_read_the_published_tokenizers(shared_dir):
    settings = model_settings(shared_dir / "tokenizers" / "fineweb_8192_bpe.model")
    assert settings == {**TRAINER_SETTINGS, "vocab_size": 8192}
    assert model_settings(shared_dir / "tokenizers" / "fineweb_1024_bpe.model")["byte_fallback"] is False


def test_load_tokenizer_refuses_a_wrong_vocab_size(shared_dir):
    message = "fineweb_8192_bpe.model: tokenizer has 8192 pieces but vocab_size is 1024"
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(shared_dir / "tokenizers" / "fineweb_8192_bpe.model", 1024)


def test_load_tokenizer_refuses_missing_and_garbage_files(tmp_path):
    with pytest.raises(TokenizerError, match="absent.model: tokenizer model not found"):
        load_tokenizer(tmp_path / "absent.model", 8192)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="garbage.model: not a SentencePiece model"):
        load_tokenizer(garbage, 8192)


def test_training_keeps_the_input_error():
    def failing():
        yield "some text"
        raise CorpusError("docs.jsonl:2: line is not valid JSON")

    with pytest.raises(CorpusError, match="docs.jsonl:2"):
        train_tokenizer(failing(), 300)
    with pytest.raises(TokenizerError, match="training failed"):
        train_tokenizer(iter([]), 300)
