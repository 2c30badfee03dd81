"""Reading documents files, and the embedded default corpus."""

from __future__ import annotations

import hashlib
import json

import pytest
import sentencepiece as spm

from pgolf.data.corpus import MIN_DOC_CHARS, CorpusError, iter_documents, write_embedded_corpus
from pgolf.data.tokenizer import train_tokenizer, training_texts


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "embedded.jsonl"
    return path, write_embedded_corpus(path)


def test_iter_documents_streams_texts_and_sees_raw_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first", "id": 1}\n{"text": "caf\\u00e9 \\u2581"}\n', encoding="utf-8")
    lines = []
    assert list(iter_documents(path, on_line=lines.append)) == ["first", "caf\u00e9 \u2581"]
    assert b"".join(lines) == path.read_bytes()


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": "broken"\n', r"docs.jsonl:2: line is not valid JSON"),
        (b'{"text": "ok"}\n\n', r"docs.jsonl:2: line is not valid JSON"),
        (b'{"text": "ok"}\n\xff\xfe\n', r"docs.jsonl:2: line is not valid JSON"),
        (b'{"body": "no text"}\n', r'docs.jsonl:1: expected an object with a "text" field'),
        (b'["text"]\n', r'docs.jsonl:1: expected an object with a "text" field'),
        (b'{"text": 42}\n', r'docs.jsonl:1: "text" must be a string, got int'),
        (b"", r"docs.jsonl: documents file is empty"),
    ],
)
def test_bad_documents_files_are_named_with_the_line(tmp_path, content, message):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        list(iter_documents(path))


def test_missing_documents_file(tmp_path):
    with pytest.raises(CorpusError, match="absent.jsonl: documents file not found"):
        list(iter_documents(tmp_path / "absent.jsonl"))


def test_embedded_corpus_is_real_english_prose_of_useful_size(embedded):
    path, info = embedded
    texts = list(iter_documents(path))
    assert info["documents"] == len(texts) > 3000
    assert info["bytes"] == path.stat().st_size > 1_500_000
    assert len(set(texts)) == len(texts)
    assert all(len(text) >= MIN_DOC_CHARS for text in texts)
    assert any(text.startswith("JSON (JavaScript Object Notation)") for text in texts)  # json's module docstring
    assert any("The \"if\" statement" in text for text in texts)  # a language-reference topic
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_embedded_corpus_is_deterministic(embedded, tmp_path):
    path, info = embedded
    again = write_embedded_corpus(tmp_path / "again.jsonl")
    assert again == info
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()


def test_embedded_corpus_can_be_cut(embedded, tmp_path):
    path, info = embedded
    first = write_embedded_corpus(tmp_path / "cut.jsonl", max_docs=10)
    assert first["documents"] == 10
    assert (tmp_path / "cut.jsonl").read_bytes().splitlines() == path.read_bytes().splitlines()[:10]


def test_embedded_corpus_trains_a_full_8192_piece_tokenizer(embedded):
    path, _ = embedded
    model = train_tokenizer(training_texts(iter_documents(path), 5_000_000), 8192)
    assert spm.SentencePieceProcessor(model_proto=model).vocab_size() == 8192



def test_the_research_corpus_is_larger_deterministic_and_its_validation_split_a_fair_sample(tmp_path):
    info = write_embedded_corpus(tmp_path / "research.jsonl", corpus="stdlib_torch")
    assert info["source"] == "python-stdlib-and-torch-docstrings" and "torch" in info["packages"]
    assert info["bytes"] > 10_000_000 and info["documents"] > 15_000
    again = write_embedded_corpus(tmp_path / "again.jsonl", max_docs=50, corpus="stdlib_torch")
    with open(tmp_path / "research.jsonl", encoding="utf-8") as whole, \
            open(tmp_path / "again.jsonl", encoding="utf-8") as cut:
        assert [next(whole) for _ in range(50)] == cut.readlines() and again["documents"] == 50
    first = [json.loads(line)["text"] for line in open(tmp_path / "research.jsonl", encoding="utf-8")][:1000]
    torch_like = sum(("tensor" in t.lower()) for t in first) / len(first)
    assert 0.05 < torch_like < 0.8  # the first documents (validation) mix the packages, not one package's files
    with pytest.raises(CorpusError, match="unknown embedded corpus"):
        write_embedded_corpus(tmp_path / "bad.jsonl", corpus="wikipedia")
