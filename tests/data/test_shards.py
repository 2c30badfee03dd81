"""The challenge's shard format: bytes on disk, streaming writer, validation errors, manifest enforcement."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pgolf.data.shards import (
    HEADER_BYTES,
    MANIFEST_NAME,
    ShardError,
    ShardWriter,
    check_dataset,
    dataset_path,
    file_sha256,
    load_validation_tokens,
    read_shard,
    shard_files,
    split_documents,
    validate_dataset,
    write_shard,
)


def write_dataset(directory, val_docs, train_docs, shard_size):
    with ShardWriter(directory, shard_size) as writer:
        for doc in val_docs:
            writer.add_document("val", doc)
        for doc in train_docs:
            writer.add_document("train", doc)
    return writer.stats


def test_shard_bytes_follow_the_challenge_layout(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, [1, 2, 65535])
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 3] and not header[3:].any()
    assert raw[HEADER_BYTES:] == b"\x01\x00\x02\x00\xff\xff"
    assert read_shard(path).tolist() == [1, 2, 65535]


def test_write_shard_refuses_ids_beyond_uint16(tmp_path):
    with pytest.raises(ShardError, match="65535"):
        write_shard(tmp_path / "s.bin", [1, 65536])


def test_reads_the_published_shards(shared_dir):
    shards = shared_dir / "fineweb" / "fineweb10B_sp8192"
    val = read_shard(shards / "fineweb_val_000000.bin")
    assert val.size == 98_425 and val[0] == 1
    assert int((val == 1).sum()) == 50  # one BOS per validation document


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda raw: np.int32(20240521).tobytes() + raw[4:], "bad magic 20240521"),
        (lambda raw: raw[:4] + np.int32(2).tobytes() + raw[8:], "unsupported shard version 2"),
        (lambda raw: raw[:-2], "truncated body"),
        (lambda raw: raw + b"\x00\x00", "2 bytes after the 4 tokens"),
        (lambda raw: raw[:100], "truncated header"),
    ],
)
def test_corrupt_shards_are_refused_naming_the_file(tmp_path, corrupt, message):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, [1, 5, 6, 7])
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ShardError, match=message) as error:
        read_shard(path)
    assert str(path) in str(error.value)


def test_missing_shard_is_named(tmp_path):
    with pytest.raises(ShardError, match="fineweb_val_000000.bin: shard file not found"):
        read_shard(tmp_path / "fineweb_val_000000.bin")


def test_writer_streams_documents_into_fixed_size_shards_without_mixing_splits(tmp_path):
    rng = np.random.default_rng(0)
    val_docs = [np.concatenate([[1], rng.integers(4, 500, size=n)]) for n in (3, 9, 4)]
    train_docs = [np.concatenate([[1], rng.integers(4, 500, size=n)]) for n in (12, 1, 6)]
    stats = write_dataset(tmp_path, val_docs, train_docs, shard_size=8)
    assert stats["val"] == {"documents": 3, "tokens": 19, "files": [f"fineweb_val_00000{i}.bin" for i in range(3)],
                            "file_tokens": [8, 8, 3]}
    assert stats["train"]["files"] == [f"fineweb_train_00000{i}.bin" for i in range(3)]
    for split, docs in (("val", val_docs), ("train", train_docs)):
        files = shard_files(tmp_path, split)
        sizes = [read_shard(path).size for path in files]
        assert sizes[:-1] == [8] * (len(files) - 1) and 0 < sizes[-1] <= 8  # the split's tail gets its own file
        stream = np.concatenate([read_shard(path) for path in files])
        assert stream.tolist() == np.concatenate(docs).tolist()


def test_writer_refuses_validation_after_training(tmp_path):
    with pytest.raises(ShardError, match="validation must come first"), ShardWriter(tmp_path, 100) as writer:
        writer.add_document("train", [1, 5])
        writer.add_document("val", [1, 6])


def test_shard_files_refuse_gaps_in_numbering(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [1])
    write_shard(tmp_path / "fineweb_train_000002.bin", [1])
    with pytest.raises(ShardError, match="not numbered 0..1: found fineweb_train_000002.bin"):
        shard_files(tmp_path, "train")


def test_validation_tokens_are_cut_to_whole_sequences_plus_one(tmp_path):
    write_dataset(tmp_path, [np.arange(1, 8), np.arange(1, 11)], [[1, 2]], shard_size=5)  # 17 val tokens
    tokens = load_validation_tokens(tmp_path, seq_len=4)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == (list(range(1, 8)) + list(range(1, 11)))[: (16 // 4) * 4 + 1]
    with pytest.raises(ShardError, match="too few for seq_len 32"):
        load_validation_tokens(tmp_path, seq_len=32)


def test_validate_dataset_counts_and_checks_ids(tmp_path):
    write_dataset(tmp_path, [[1, 5, 6], [1, 7]], [[1, 8, 9, 10]], shard_size=4)
    stats = validate_dataset(tmp_path, vocab_size=11)
    assert stats["val"]["documents"] == 2 and stats["val"]["tokens"] == 5
    assert stats["train"] == {"files": ["fineweb_train_000000.bin"], "tokens": 4, "documents": 1, "file_tokens": [4]}
    message = r"fineweb_train_000000.bin: token id 10 at position 3 is not below vocab_size 10"
    with pytest.raises(ShardError, match=message):
        validate_dataset(tmp_path, vocab_size=10)


def test_validate_dataset_needs_both_splits(tmp_path):
    write_dataset(tmp_path, [[1, 5]], [], shard_size=4)
    with pytest.raises(ShardError, match="no fineweb_train_"):
        validate_dataset(tmp_path, vocab_size=10)


def test_split_documents_cuts_at_bos():
    docs = split_documents(np.array([1, 5, 6, 1, 1, 7]), bos_id=1, source="x")
    assert [d.tolist() for d in docs] == [[5, 6], [], [7]]
    with pytest.raises(ShardError, match="does not start with a BOS"):
        split_documents(np.array([5, 1, 6]), bos_id=1, source="x")


def test_dataset_path_is_the_challenge_layout():
    assert dataset_path("data", 8192).as_posix() == "data/datasets/fineweb10B_sp8192"


# ---------------------------------------------------------------- the manifest, enforced

VOCAB = 50


@pytest.fixture
def dataset(tmp_path):
    """A dataset as the tokenize stage leaves it: shards, manifest (file sizes, tokenizer sha256), tokenizer."""
    rng = np.random.default_rng(0)
    directory = tmp_path / "datasets" / "fineweb10B_sp50"
    docs = [np.concatenate([[1], rng.integers(4, VOCAB, size=n)]) for n in (5, 9, 3, 12, 7, 30, 2)]
    stats = write_dataset(directory, docs[:2], docs[2:], shard_size=10)
    tokenizer = tmp_path / "tokenizers" / "fineweb_50_bpe.model"
    tokenizer.parent.mkdir()
    tokenizer.write_bytes(b"the tokenizer the shards were made with")
    manifest = {"vocab_size": VOCAB, "splits": stats, "tokenizer": {"sha256": file_sha256(tokenizer)}}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory, tokenizer


def test_a_dataset_that_matches_its_manifest_passes(dataset):
    directory, tokenizer = dataset
    manifest = check_dataset(directory, tokenizer, VOCAB)
    assert manifest["splits"]["train"]["files"] == [f"fineweb_train_00000{i}.bin" for i in range(6)]


def test_a_missing_listed_shard_is_named(dataset):
    directory, tokenizer = dataset
    (directory / "fineweb_train_000005.bin").unlink()  # the last one: the numbering stays gap-free
    with pytest.raises(ShardError, match=r"fineweb_train_000005.bin: listed in manifest.json but missing$"):
        check_dataset(directory, tokenizer, VOCAB)


def test_an_unlisted_shard_is_named(dataset):
    directory, tokenizer = dataset
    write_shard(directory / "fineweb_train_000006.bin", [1, 5, 6])
    with pytest.raises(ShardError, match=r"fineweb_train_000006.bin: a shard that manifest.json does not list$"):
        check_dataset(directory, tokenizer, VOCAB)


def test_a_shard_of_another_size_is_named_even_in_a_split_that_is_not_scanned(dataset):
    directory, tokenizer = dataset
    write_shard(directory / "fineweb_train_000002.bin", [1, 5, 6])
    with pytest.raises(ShardError, match=r"fineweb_train_000002.bin: 3 tokens, but manifest.json lists 10$"):
        check_dataset(directory, tokenizer, VOCAB, scan=("val",))


def test_a_manifest_without_file_sizes_still_checks_the_split_totals(dataset):
    directory, tokenizer = dataset
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    del manifest["splits"]["train"]["file_tokens"]
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    check_dataset(directory, tokenizer, VOCAB)
    write_shard(directory / "fineweb_train_000002.bin", [1, 5, 6])
    with pytest.raises(ShardError, match=r"the train shards hold 52 tokens, but manifest.json lists 59$"):
        check_dataset(directory, tokenizer, VOCAB)


def test_a_token_id_beyond_the_vocabulary_is_named_with_its_position(dataset):
    directory, tokenizer = dataset
    path = directory / "fineweb_train_000003.bin"
    tokens = read_shard(path).copy()
    tokens[4] = VOCAB + 3
    write_shard(path, tokens)
    with pytest.raises(ShardError, match=rf"fineweb_train_000003.bin: token id 53 at position 4 is not below vocab_size 50"):
        check_dataset(directory, tokenizer, VOCAB)
    check_dataset(directory, tokenizer, VOCAB, scan=("val",))  # evaluate reads only the validation split


def test_documents_that_do_not_add_up_are_refused(dataset):
    directory, tokenizer = dataset
    path = directory / "fineweb_val_000000.bin"
    tokens = read_shard(path).copy()
    tokens[2] = 1  # one more BOS: two documents become three
    write_shard(path, tokens)
    with pytest.raises(ShardError, match=r"the val shards hold 3 documents, but manifest.json lists 2$"):
        check_dataset(directory, tokenizer, VOCAB)


def test_a_different_tokenizer_is_named(dataset):
    directory, tokenizer = dataset
    tokenizer.write_bytes(b"another tokenizer of the same vocabulary size")
    with pytest.raises(ShardError, match=rf"^{tokenizer}: sha256 [0-9a-f]{{16}}\.\.\. is not that of the tokenizer"):
        check_dataset(directory, tokenizer, VOCAB)
    tokenizer.unlink()
    with pytest.raises(ShardError, match=rf"^{tokenizer}: tokenizer not found"):
        check_dataset(directory, tokenizer, VOCAB)


def test_a_wrong_missing_or_unreadable_manifest_is_named(dataset):
    directory, tokenizer = dataset
    with pytest.raises(ShardError, match=r"manifest.json: vocab_size 50, but the model's vocab_size is 64$"):
        check_dataset(directory, tokenizer, 64)
    (directory / MANIFEST_NAME).write_text('{"vocab_size": 50, "splits": {}}')
    with pytest.raises(ShardError, match=r"manifest.json: not a pgolf dataset manifest \(KeyError: 'val'\)"):
        check_dataset(directory, tokenizer, VOCAB)
    (directory / MANIFEST_NAME).write_bytes(b"\xff not json")
    with pytest.raises(ShardError, match=r"manifest.json: not a pgolf dataset manifest \(UnicodeDecodeError"):
        check_dataset(directory, tokenizer, VOCAB)
    (directory / MANIFEST_NAME).unlink()
    with pytest.raises(ShardError, match=r"manifest.json: dataset manifest not found"):
        check_dataset(directory, tokenizer, VOCAB)
    with pytest.raises(ShardError, match=r"nope: dataset directory not found"):
        check_dataset(directory.parent / "nope", tokenizer, VOCAB)


def test_a_dataset_stranded_by_a_killed_replacement_is_recovered_first(dataset):
    directory, tokenizer = dataset
    os.rename(directory, directory.with_name(f".{directory.name}.old-{2**22 + 7}"))  # no such process
    check_dataset(directory, tokenizer, VOCAB)
    assert sorted(p.name for p in directory.parent.iterdir()) == [directory.name]
