"""Byte accounting: every score divides by the original bytes, and data that cannot give them is refused.

A CaseOps dataset is made here by the tokenize stage's own code from the embedded corpus with the
record's published tokenizer (tests/assets); the parity test scores the golden documents.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from pgolf.config import EvaluateConfig, ModelConfig, TokenizeConfig
from pgolf.data.accounting import ValidationStream, load_validation_stream, lookup_stream, sidecar_stream
from pgolf.data.dataset import build_dataset
from pgolf.data.shards import MANIFEST_NAME, SIDECAR, ShardError, check_dataset, read_shard, shard_name, write_shard
from pgolf.data.tokenizer import ByteTables, byte_tables, document_byte_counts
from pgolf.eval.bpb import eval_plain, eval_sliding
from pgolf.eval.score import checked_validation_set
from pgolf.model.gpt import GPT
from tests.data.test_caseops import CASEOPS_TOKENIZER, caseops_ids_and_counts, load_frontier

CPU = torch.device("cpu")
VOCAB = 8192


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory) -> Path:
    """A CaseOps dataset with its manifest: 20 validation documents of the embedded corpus, the published tokenizer."""
    work = tmp_path_factory.mktemp("caseops")
    dataset = work / "fineweb10B_sp8192"
    dataset.mkdir()
    cfg = TokenizeConfig(tokenizer_path=str(CASEOPS_TOKENIZER), text_transform="caseops", embedded_max_docs=60,
                         num_val_docs=20, shard_size=800, num_workers=1)
    manifest = build_dataset(cfg, work / "tokenizer.model", dataset)
    (dataset / MANIFEST_NAME).write_text(json.dumps(manifest))
    return dataset


@pytest.fixture
def data(caseops_data, tmp_path) -> Path:
    """A copy to damage."""
    copy = tmp_path / caseops_data.name
    shutil.copytree(caseops_data, copy)
    shutil.copy(caseops_data.parent / "tokenizer.model", tmp_path / "tokenizer.model")
    return copy


def tokenizer_of(dataset: Path) -> Path:
    return dataset.parent / "tokenizer.model"


def checked(dataset: Path) -> ValidationStream:
    return checked_validation_set(dataset, tokenizer_of(dataset), VOCAB, EvaluateConfig(eval_seq_len=64))


def test_the_manifest_lists_and_checks_the_sidecar(caseops_data):
    manifest = json.loads((caseops_data / MANIFEST_NAME).read_text())
    assert manifest["text_transform"] == "caseops"
    sidecar = manifest["sidecar"]
    assert sidecar["files"] == [shard_name(SIDECAR, i) for i in range(len(manifest["splits"]["val"]["files"]))]
    assert sidecar["file_tokens"] == manifest["splits"]["val"]["file_tokens"] and len(sidecar["files"]) > 1
    assert sidecar["bytes"] == manifest["byte_check"]["val_bytes"] == manifest["byte_check"]["text_bytes"]
    stream = checked(caseops_data)
    assert stream.rule == "byte sidecar"
    full = load_validation_stream(caseops_data, tokenizer_of(caseops_data), VOCAB, seq_len=1)  # nothing cut
    assert full.total_bytes() == sidecar["bytes"]


def test_caseops_shards_without_their_sidecar_are_refused(data):
    for path in data.glob("fineweb_val_bytes_*.bin"):
        path.unlink()
    first = data / shard_name(SIDECAR, 0)
    with pytest.raises(ShardError, match=f"{first}: listed in {MANIFEST_NAME} but missing"):
        checked(data)
    manifest = json.loads((data / MANIFEST_NAME).read_text())
    (data / MANIFEST_NAME).write_text(json.dumps(manifest | {"sidecar": None}))
    with pytest.raises(ShardError, match=f"{data / MANIFEST_NAME}: the data is caseops text but no byte sidecar"):
        check_dataset(data, tokenizer_of(data), VOCAB, scan=())
    with pytest.raises(ShardError, match=f"{first}: byte sidecar not found, but .* declares caseops text"):
        load_validation_stream(data, tokenizer_of(data), VOCAB, 64)
    (data / MANIFEST_NAME).unlink()  # the challenge's layout has no manifest: the tokenizer gives it away
    with pytest.raises(ShardError, match=rf"{first}: byte sidecar not found, but .*tokenizer.model holds CaseOps "
                                         r"markers \(ids \[4, 5, 6, 7\]\)"):
        load_validation_stream(data, tokenizer_of(data), VOCAB, 64)


def test_a_sidecar_of_the_wrong_length_is_refused_naming_it(data):
    path = data / shard_name(SIDECAR, 1)
    counts = np.array(read_shard(path))  # a copy: the file is rewritten
    write_shard(path, counts[:-1])
    with pytest.raises(ShardError, match=f"{path}: {counts.size - 1} byte counts, but {MANIFEST_NAME} lists "
                                         f"{counts.size}"):
        checked(data)
    (data / MANIFEST_NAME).unlink()
    with pytest.raises(ShardError, match=f"{path}: {counts.size - 1} byte counts for the {counts.size} tokens"):
        load_validation_stream(data, tokenizer_of(data), VOCAB, 64)


def test_a_sidecar_of_the_wrong_sum_is_refused_naming_it(data):
    path = data / shard_name(SIDECAR, 0)
    counts = np.array(read_shard(path))
    counts[np.flatnonzero(counts)[5]] += 1  # one byte too many for a token
    write_shard(path, counts)
    with pytest.raises(ShardError, match=f"{path}: its byte counts sum to {int(counts.sum())}, but {MANIFEST_NAME} "
                                         f"lists {int(counts.sum()) - 1}"):
        checked(data)


def test_a_sidecar_that_counts_a_bos_is_refused(data):
    path = data / shard_name(SIDECAR, 0)
    counts = np.array(read_shard(path))
    counts[0] = 3
    write_shard(path, counts)
    (data / MANIFEST_NAME).unlink()
    with pytest.raises(ShardError, match=f"{path}: 3 bytes at position 0, a BOS"):
        load_validation_stream(data, tokenizer_of(data), VOCAB, 64)


def test_an_unlisted_or_orphan_sidecar_is_refused(data):
    orphan = data / shard_name(SIDECAR, 9)
    write_shard(orphan, [0, 1])
    with pytest.raises(ShardError, match=f"{orphan}: a byte sidecar that {MANIFEST_NAME} does not list"):
        checked(data)


def test_a_caseops_tokenizer_on_plain_shards_without_sidecar_is_refused(tmp_path, shared_dir):
    """The pitfall of docs/BYTES.md: lookup tables of a CaseOps tokenizer count marker bytes."""
    shutil.copy(shared_dir / "fineweb" / "fineweb10B_sp8192" / "fineweb_val_000000.bin", tmp_path)
    with pytest.raises(ShardError, match="holds CaseOps markers"):
        load_validation_stream(tmp_path, CASEOPS_TOKENIZER, VOCAB, 64)
    plain = load_validation_stream(tmp_path, shared_dir / "tokenizers" / "fineweb_8192_bpe.model", VOCAB, 64)
    assert plain.rule == "lookup tables"


def test_streams_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="byte sidecar"):
        sidecar_stream(torch.arange(10), torch.ones(9, dtype=torch.int32))
    with pytest.raises(ValueError, match="3 targets"):
        ValidationStream(torch.arange(4), torch.ones(4, dtype=torch.int32), "lookup tables")


# ------------------------------------------------------------------ parity: sidecar bytes are the text's bytes


def fixed_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, embedding_dim=32, num_heads=2,
                            num_kv_heads=1, rope_dims=8, rope_train_seq_len=128, xsa_last_n=2, num_loops=1,
                            loop_start=0, loop_end=1))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.looping_active = True
    return model


def test_bpb_from_the_sidecar_is_bpb_of_the_original_text(shared_dir):
    """A fixed model on the golden documents' CaseOps stream: the sidecar's bpb equals the bpb over the text's bytes.

    The sliding evaluation scores every target once, so its token count is the stream's and the
    denominator the text's UTF-8 bytes: equal to 1e-9 relative (they are the same integer).
    """
    frontier = load_frontier(shared_dir)
    texts = [doc["text"] for doc in frontier["caseops"]["docs"]]
    tokens, counts = [], []
    for text in texts:
        ids, byte_counts = caseops_ids_and_counts(text)
        tokens += [1, *ids]
        counts += [0, *byte_counts]
    stream = sidecar_stream(torch.tensor(tokens), torch.tensor(counts))
    score = eval_sliding(fixed_model(), stream, 128, 64, 16, CPU)
    text_bytes = sum(len(text.encode("utf-8")) for text in texts)
    from_text = score.loss / math.log(2) * (len(tokens) - 1) / text_bytes
    assert score.bpb == pytest.approx(from_text, rel=1e-9)
    assert stream.total_bytes() == text_bytes == frontier["caseops"]["stream_bytes_total"]

    # the plain tokenizer's lookup tables count the same bytes wherever its normaliser keeps the text's length
    plain = spm.SentencePieceProcessor(model_file=str(shared_dir / "tokenizers" / "fineweb_8192_bpe.model"))
    table, _ = document_byte_counts(plain, byte_tables(plain, VOCAB), plain.encode(texts), 1)
    for text, table_bytes in zip(texts, table, strict=True):
        normalised = plain.normalize(text).replace("\u2581", " ")
        assert table_bytes == len(normalised.encode("utf-8"))
        if len(normalised.encode("utf-8")) == len(text.encode("utf-8")):
            assert table_bytes == sum(caseops_ids_and_counts(text)[1])


def test_lookup_stream_counts_as_the_reference_rule():
    tables_tokens = torch.tensor([1, 5, 6, 1, 7, 5])
    tables = ByteTables(base_bytes=torch.tensor([0, 0, 0, 0, 0, 2, 3, 1], dtype=torch.int16),
                        has_leading_space=torch.tensor([False] * 5 + [True, True, False]),
                        is_boundary=torch.tensor([True, True, True, True, False, False, False, False]))
    stream = lookup_stream(tables_tokens, tables)
    assert stream.target_bytes.tolist() == [2, 4, 0, 1, 3]  # after BOS no space byte; a BOS target counts 0
    model = fixed_model()
    tokens = torch.randint(0, VOCAB, (129,))
    assert eval_plain(model, lookup_stream(tokens, tables_all_ones()), 64, 2, CPU).bpb == pytest.approx(
        eval_plain(model, sidecar_stream(tokens, torch.ones(129, dtype=torch.int32)), 64, 2, CPU).bpb, rel=1e-12)


def tables_all_ones() -> ByteTables:
    return ByteTables(torch.ones(VOCAB, dtype=torch.int16), torch.zeros(VOCAB, dtype=torch.bool),
                      torch.zeros(VOCAB, dtype=torch.bool))
