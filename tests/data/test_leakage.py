"""Validation documents in the training shards are refused, named; near misses and clean data pass."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from pgolf.data.leakage import LeakError, check_no_leaks, find_leaks
from pgolf.data.shards import read_shard, split_documents
from tests.data.test_shards import write_dataset


def documents(seed: int, lengths: list[int], vocab: int = 500) -> list[np.ndarray]:
    """``[bos] + ids`` documents of the given lengths (ids from 4 up: never the BOS)."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[1], rng.integers(4, vocab, size=n)]) for n in lengths]


def test_a_planted_validation_document_is_refused_and_named(tmp_path):
    val = documents(0, [40, 25, 60])
    train = documents(1, [30, 70, 45])
    planted = [*train[:2], val[1], train[2]]  # validation document 1 between two training documents
    write_dataset(tmp_path, val, planted, shard_size=64)  # small files: documents run across them
    with pytest.raises(LeakError) as caught:
        check_no_leaks(tmp_path)
    body = val[1][1:].astype("<u2")
    message = str(caught.value)
    assert "1 validation document(s) also in the training data" in message
    # named: its number, file, offset (after document 0's 41 tokens), length, hash, and where training has it
    assert (f"validation document 1 (fineweb_val_000000.bin at token 41, 25 tokens, "
            f"sha256 {hashlib.sha256(body.tobytes()).hexdigest()[:16]}) is also in fineweb_train_000001.bin at "
            f"token {31 + 71 - 64}") in message


def test_documents_running_across_shard_files_are_compared_whole(tmp_path):
    val = documents(2, [150, 10])
    train = documents(3, [20])
    write_dataset(tmp_path, val, [train[0], val[0], *documents(4, [5])], shard_size=50)  # val[0] spans 4 files
    leaks = find_leaks(tmp_path)
    assert [(leak.index, leak.tokens, leak.train.file, leak.train.offset) for leak in leaks] == [
        (0, 150, "fineweb_train_000000.bin", 21)]


def test_near_misses_are_not_leaks(tmp_path):
    """Same length, first tokens and last token (the same fingerprint), one middle token different: no leak;
    a validation document as the start of a longer training document is not a duplicate either."""
    val = documents(5, [30])
    twin = val[0].copy()
    twin[15] = twin[15] + 1
    write_dataset(tmp_path, val, [twin, np.concatenate([val[0], [7, 8]])], shard_size=1000)
    assert find_leaks(tmp_path) == []


def test_every_leaked_document_is_counted_and_the_first_named(tmp_path):
    val = documents(6, [12] * 8)
    write_dataset(tmp_path, val, [*reversed(val), *documents(7, [9])], shard_size=40)
    leaks = find_leaks(tmp_path)
    assert [leak.index for leak in leaks] == list(range(8))
    with pytest.raises(LeakError, match=r"8 validation document\(s\).*validation document 4 .*; and 3 more\."):
        check_no_leaks(tmp_path)


def test_the_published_sample_is_clean_until_a_validation_document_is_planted(shared_dir, tmp_path):
    """FineWeb documents as the challenge ships them: 50 validation, 100 training documents."""
    published = shared_dir / "fineweb" / "fineweb10B_sp8192"
    assert find_leaks(published) == []
    val = split_documents(np.asarray(read_shard(published / "fineweb_val_000000.bin")), 1, "val")
    train = split_documents(np.asarray(read_shard(published / "fineweb_train_000000.bin")), 1, "train")
    shutil.copy(published / "fineweb_val_000000.bin", tmp_path)
    with_bos = [np.concatenate([[1], doc]) for doc in [*train[:60], val[17], *train[60:]]]
    write_dataset(tmp_path / "planted", [], with_bos, shard_size=100_000)
    for path in (tmp_path / "planted").glob("fineweb_train_*.bin"):
        shutil.move(path, tmp_path / path.name)
    with pytest.raises(LeakError, match=rf"validation document 17 \(fineweb_val_000000.bin at token [\d,]+, "
                                        rf"{val[17].size:,} tokens"):
        check_no_leaks(tmp_path)


def test_the_train_stage_refuses_to_start_on_leaked_data(tmp_path, monkeypatch):
    from stages import train as stage
    from tests.conftest import write_manifest
    from tests.train.test_loop import PIPELINE, TINY_MODEL, stage_params

    monkeypatch.chdir(tmp_path)
    dataset = tmp_path / "data" / "datasets" / f"fineweb10B_sp{TINY_MODEL.vocab_size}"
    val = documents(8, [40, 30], vocab=TINY_MODEL.vocab_size)
    write_dataset(dataset, val, [*documents(9, [500, 300], vocab=TINY_MODEL.vocab_size), val[0]], shard_size=4096)
    tokenizer = tmp_path / "data" / "tokenizers" / f"fineweb_{TINY_MODEL.vocab_size}_bpe.model"
    tokenizer.parent.mkdir(parents=True)
    tokenizer.write_bytes(b"stands in for the tokenizer")
    write_manifest(dataset, TINY_MODEL.vocab_size, tokenizer)
    with pytest.raises(LeakError, match=r"validation document 0 \(fineweb_val_000000.bin at token 0, 40 tokens"):
        stage.run(stage_params(), PIPELINE)
    assert not (tmp_path / "out" / "train").exists()  # refused before any training
