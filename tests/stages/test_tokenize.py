"""The tokenize stage end to end: parity with the published shards, training, imports, bad input."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from pgolf.data.caseops import MARKERS
from pgolf.data.shards import read_shard, shard_files, validate_dataset, write_shard
from pgolf.data.tokenizer import TRAINER_SETTINGS, train_tokenizer
from pgolf.pipeline.stage import Workspace
from stages import tokenize
from tests.conftest import ASSETS_DIR

PIPELINE = Workspace.pipeline()  # the stage as DVC runs it

DATASET = "data/datasets/fineweb10B_sp{}"
MODEL = "data/tokenizers/fineweb_{}_bpe.model"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def sample(shared_dir):
    return {
        "docs": shared_dir / "fineweb" / "docs_sample.jsonl",
        "model": shared_dir / "tokenizers" / "fineweb_8192_bpe.model",
        "shards": shared_dir / "fineweb" / "fineweb10B_sp8192",
    }


def run(workdir, **keys):
    params = workdir / "params.yaml"
    params.write_text(json.dumps({"tokenize": keys}))
    return tokenize.main(["--params", str(params)])


def manifest(workdir, vocab=8192):
    return json.loads((workdir / DATASET.format(vocab) / "manifest.json").read_text())


def assert_no_output(workdir, vocab=8192):
    assert not (workdir / DATASET.format(vocab)).exists()
    assert not (workdir / MODEL.format(vocab)).exists()
    leftovers = [p for p in (workdir / "data").rglob("*") if p.is_file()] if (workdir / "data").exists() else []
    assert leftovers == []


def assert_same_files(left, right, names):
    for name in names:
        assert (left / name).read_bytes() == (right / name).read_bytes(), name


def test_a_validation_document_repeated_among_training_ones_is_left_out(workdir, sample):
    """The same text twice in a corpus: once a validation document, so never a training one (pgolf.data.leakage)."""
    lines = sample["docs"].read_text().splitlines(keepends=True)
    docs = workdir / "docs.jsonl"
    docs.write_text("".join(lines[:120] + [lines[7], lines[30]] + lines[120:]))  # two validation documents again
    assert run(workdir, docs_path=str(docs), tokenizer_path=str(sample["model"]), num_val_docs=50) == 0
    out = workdir / DATASET.format(8192)
    assert_same_files(out, sample["shards"], ["fineweb_val_000000.bin", "fineweb_train_000000.bin"])
    info = manifest(workdir)
    assert info["input"]["val_duplicates_left_out_of_train"] == 2 and info["splits"]["train"]["documents"] == 100
    assert "val_duplicates_left_out_of_train" not in manifest_of_clean_sample(workdir, sample)


def manifest_of_clean_sample(workdir, sample):
    shutil.rmtree(workdir / "data")
    assert run(workdir, docs_path=str(sample["docs"]), tokenizer_path=str(sample["model"]), num_val_docs=50) == 0
    return manifest(workdir)["input"]


def test_sample_with_the_published_tokenizer_gives_the_published_shards(workdir, sample):
    code = run(workdir, docs_path=str(sample["docs"]), tokenizer_path=str(sample["model"]), num_val_docs=50)
    assert code == 0
    out = workdir / DATASET.format(8192)
    names = ["fineweb_val_000000.bin", "fineweb_train_000000.bin"]
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(names)
    assert_same_files(out, sample["shards"], names)
    assert (workdir / MODEL.format(8192)).read_bytes() == sample["model"].read_bytes()
    info = manifest(workdir)
    assert info["splits"]["val"]["documents"] == 50 and info["splits"]["train"]["documents"] == 100
    assert info["input"]["sha256"] == hashlib.sha256(sample["docs"].read_bytes()).hexdigest()
    assert info["input"]["documents"] == 150
    check = info["byte_check"]
    assert check["documents"] == 50 and check["agree"] and check["table_bytes"] == check["decoded_bytes"] > 0
    assert info["tokenizer"]["settings"] == {**TRAINER_SETTINGS, "vocab_size": 8192}
    figures = json.loads((workdir / "out" / "tokenize" / "metrics.json").read_text())
    assert figures["val_documents"] == 50 and figures["train_tokens"] == info["splits"]["train"]["tokens"]
    assert figures["val_table_bytes"] == figures["val_decoded_bytes"] == check["table_bytes"]


def test_published_shards_are_validated_and_linked(workdir, sample):
    code = run(workdir, shards_path=str(sample["shards"]), tokenizer_path=str(sample["model"]))
    assert code == 0
    out = workdir / DATASET.format(8192)
    assert_same_files(out, sample["shards"], ["fineweb_val_000000.bin", "fineweb_train_000000.bin"])
    info = manifest(workdir)
    assert info["splits"]["val"]["documents"] == 50 and info["splits"]["train"]["tokens"] == 246_672
    assert info["byte_check"]["agree"] and info["byte_check"]["documents"] == 50
    val_sha = hashlib.sha256((sample["shards"] / "fineweb_val_000000.bin").read_bytes()).hexdigest()
    assert info["input"]["sha256"]["fineweb_val_000000.bin"] == val_sha


def test_training_a_tokenizer_and_sharding_in_small_files(workdir, sample):
    code = run(workdir, docs_path=str(sample["docs"]), vocab_size=512, num_val_docs=20, shard_size=40_000,
               tokenizer_train_docs=100)
    assert code == 0
    out = workdir / DATASET.format(512)
    model = workdir / MODEL.format(512)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == 512
    stats = validate_dataset(out, 512)
    assert len(stats["train"]["files"]) > 1 and stats["val"]["documents"] == 20
    texts = [json.loads(line)["text"] for line in sample["docs"].read_text(encoding="utf-8").splitlines()]
    expected = [[1, *sp.encode(text)] for text in texts]
    for split, docs in (("val", expected[:20]), ("train", expected[20:])):
        stream = np.concatenate([read_shard(path) for path in shard_files(out, split)])
        assert stream.tolist() == [t for doc in docs for t in doc]
    info = manifest(workdir, 512)
    assert info["tokenizer"]["trained"] and info["tokenizer"]["train_documents"] == 100
    assert info["tokenizer"]["settings"] == {**TRAINER_SETTINGS, "vocab_size": 512}
    assert info["byte_check"]["agree"]


def test_embedded_default_builds_an_8192_dataset(workdir):
    assert run(workdir, num_val_docs=100, embedded_max_docs=1500) == 0
    info = manifest(workdir)
    assert info["input"]["docs_path"] is None and info["input"]["embedded"]["documents"] == 1500
    assert info["splits"]["val"]["documents"] == 100 and info["splits"]["train"]["documents"] == 1400
    assert spm.SentencePieceProcessor(model_file=str(workdir / MODEL.format(8192))).vocab_size() == 8192
    assert info["byte_check"]["agree"]


def test_a_failed_run_keeps_the_previous_outputs(workdir, sample):
    assert run(workdir, docs_path=str(sample["docs"]), tokenizer_path=str(sample["model"]), num_val_docs=50) == 0
    before = (workdir / DATASET.format(8192) / "fineweb_val_000000.bin").read_bytes()
    assert run(workdir, docs_path=str(sample["docs"]), tokenizer_path=str(sample["model"]), num_val_docs=150) == 2
    assert (workdir / DATASET.format(8192) / "fineweb_val_000000.bin").read_bytes() == before
    assert sorted(p.name for p in (workdir / "data" / "datasets").iterdir()) == ["fineweb10B_sp8192"]


def write_docs(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def good_line(index):
    return json.dumps({"text": f"Document number {index} says something."}).encode()


@pytest.mark.parametrize(
    "lines, message",
    [
        ([good_line(0), b"{not json", good_line(2)], r"docs.jsonl:2: line is not valid JSON"),
        ([good_line(0), good_line(1), b'{"title": "x"}'], r'docs.jsonl:3: expected an object with a "text" field'),
        ([], r"docs.jsonl: documents file is empty"),
        ([good_line(i) for i in range(5)], r"docs.jsonl: 5 documents, but num_val_docs is 5"),
    ],
)
def test_bad_documents_files_fail_cleanly(workdir, sample, capsys, lines, message):
    docs = write_docs(workdir / "docs.jsonl", lines)
    assert run(workdir, docs_path=str(docs), tokenizer_path=str(sample["model"]), num_val_docs=5) == 2
    assert capsys.readouterr().err.count("pgolf tokenize: error:") == 1
    assert_no_output(workdir)
    with pytest.raises(ValueError, match=message):
        tokenize.run({"tokenize": {"docs_path": str(docs), "tokenizer_path": str(sample["model"]), "num_val_docs": 5}}, PIPELINE)


def test_bad_documents_fail_before_tokenizer_training(workdir):
    docs = write_docs(workdir / "docs.jsonl", [good_line(0), b"[1, 2]"])
    with pytest.raises(ValueError, match=r"docs.jsonl:2: expected an object"):
        tokenize.run({"tokenize": {"docs_path": str(docs), "vocab_size": 300, "num_val_docs": 1}}, PIPELINE)
    assert_no_output(workdir, 300)


def test_missing_documents_file(workdir, capsys):
    assert run(workdir, docs_path=str(workdir / "absent.jsonl")) == 2
    assert "absent.jsonl: documents file not found" in capsys.readouterr().err
    assert_no_output(workdir)


def test_a_tokenizer_with_the_wrong_vocab_is_refused(workdir, sample, capsys):
    assert run(workdir, docs_path=str(sample["docs"]), tokenizer_path=str(sample["model"]), vocab_size=1024,
               num_val_docs=50) == 2
    assert "fineweb_8192_bpe.model: tokenizer has 8192 pieces but vocab_size is 1024" in capsys.readouterr().err
    assert_no_output(workdir, 1024)


def test_a_tokenizer_without_the_space_piece_is_refused(workdir, sample, capsys):
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(5, 40))) for _ in range(2000)]
    model = workdir / "nospace.model"
    model.write_bytes(train_tokenizer(iter(texts), 300))
    assert run(workdir, docs_path=str(sample["docs"]), tokenizer_path=str(model), vocab_size=300,
               num_val_docs=50) == 2
    assert 'nospace.model: tokenizer has no "\u2581" piece' in capsys.readouterr().err
    assert_no_output(workdir, 300)


def test_a_tokenizer_that_miscounts_bytes_is_refused(workdir, sample, shared_dir, capsys):
    model = shared_dir / "tokenizers" / "fineweb_1024_bpe.model"  # no byte fallback: <unk> has no bytes
    assert run(workdir, docs_path=str(sample["docs"]), tokenizer_path=str(model), vocab_size=1024,
               num_val_docs=50) == 2
    assert "bits per byte would be miscounted" in capsys.readouterr().err
    assert_no_output(workdir, 1024)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda raw: b"\x00\x00\x00\x00" + raw[4:], "fineweb_train_000000.bin: bad magic 0"),
        (lambda raw: raw[:-10], "fineweb_train_000000.bin: truncated body"),
    ],
)
def test_corrupt_shards_are_refused(workdir, sample, capsys, corrupt, message):
    shards = workdir / "published"
    shutil.copytree(sample["shards"], shards)
    train = shards / "fineweb_train_000000.bin"
    train.write_bytes(corrupt(train.read_bytes()))
    assert run(workdir, shards_path=str(shards), tokenizer_path=str(sample["model"])) == 2
    assert message in capsys.readouterr().err
    assert_no_output(workdir)


def test_shards_with_ids_beyond_the_vocab_are_refused(workdir, sample, capsys):
    shards = workdir / "published"
    shutil.copytree(sample["shards"], shards)
    write_shard(shards / "fineweb_train_000001.bin", [1, 8192])
    assert run(workdir, shards_path=str(shards), tokenizer_path=str(sample["model"])) == 2
    message = "fineweb_train_000001.bin: token id 8192 at position 1 is not below vocab_size 8192"
    assert message in capsys.readouterr().err
    assert_no_output(workdir)


def test_shards_need_their_tokenizer(workdir, sample, capsys):
    assert run(workdir, shards_path=str(sample["shards"])) == 2
    assert f"tokenize.shards_path: '{sample['shards']}' is not allowed: needs tokenizer_path" in capsys.readouterr().err


# ------------------------------------------------------------------ CaseOps text (tokenize.text_transform: caseops)

CASEOPS_MODEL = ASSETS_DIR / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def test_a_caseops_tokenizer_is_trained_with_the_markers_reserved(workdir):
    assert run(workdir, vocab_size=512, text_transform="caseops", embedded_max_docs=400, num_val_docs=40,
               tokenizer_train_docs=400, num_workers=1) == 0
    sp = spm.SentencePieceProcessor(model_file=str(workdir / MODEL.format(512)))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(MARKERS)
    pieces = [sp.id_to_piece(i) for i in range(8, 512) if not sp.is_byte(i)]
    assert not any(c.isascii() and c.isupper() for piece in pieces for c in piece)  # case lives in the markers
    info = manifest(workdir, 512)
    assert info["text_transform"] == "caseops" and info["byte_check"]["rule"] == "byte sidecar"
    assert info["sidecar"]["files"] == ["fineweb_val_bytes_000000.bin"]
    assert info["sidecar"]["bytes"] == info["byte_check"]["val_bytes"] == info["byte_check"]["text_bytes"] - \
        info["byte_check"]["uncovered_bytes"]
    figures = json.loads((workdir / "out" / "tokenize" / "metrics.json").read_text())
    assert figures["val_bytes"] == info["sidecar"]["bytes"]


def test_the_published_caseops_tokenizer_is_reused(workdir, sample):
    assert run(workdir, docs_path=str(sample["docs"]), tokenizer_path=str(CASEOPS_MODEL), text_transform="caseops",
               num_val_docs=50, num_workers=1) == 0
    info = manifest(workdir)
    texts = [json.loads(line)["text"] for line in sample["docs"].read_text().splitlines()[:50]]
    assert info["sidecar"]["bytes"] == sum(len(t.encode("utf-8")) for t in texts)  # every byte, none at the ends
    assert (workdir / MODEL.format(8192)).read_bytes() == CASEOPS_MODEL.read_bytes()


def test_the_caseops_tokenizer_on_plain_text_is_refused(workdir, sample, capsys):
    assert run(workdir, docs_path=str(sample["docs"]), tokenizer_path=str(CASEOPS_MODEL), num_val_docs=50) == 2
    assert "hold CaseOps markers, but tokenize.text_transform is none" in capsys.readouterr().err
    assert_no_output(workdir)


def test_a_plain_tokenizer_for_caseops_text_is_refused(workdir, sample, capsys):
    assert run(workdir, docs_path=str(sample["docs"]), tokenizer_path=str(sample["model"]), num_val_docs=50,
               text_transform="caseops") == 2
    assert "a CaseOps tokenizer keeps its markers U+E001..U+E004 as ids 4..7" in capsys.readouterr().err
    assert_no_output(workdir)


@pytest.fixture
def caseops_shards(workdir, sample) -> Path:
    """CaseOps shards with their sidecar, as published (made here by the stage, then moved out)."""
    assert run(workdir, docs_path=str(sample["docs"]), tokenizer_path=str(CASEOPS_MODEL), text_transform="caseops",
               num_val_docs=50, shard_size=20_000, num_workers=1) == 0
    published = workdir / "published"
    shutil.move(workdir / DATASET.format(8192), published)
    (published / "manifest.json").unlink()  # published data has the challenge's layout, no pgolf manifest
    shutil.rmtree(workdir / "data")
    return published


def test_published_caseops_shards_are_imported_with_their_sidecar(workdir, caseops_shards):
    assert run(workdir, shards_path=str(caseops_shards), tokenizer_path=str(CASEOPS_MODEL),
               text_transform="caseops") == 0
    info = manifest(workdir)
    sidecars = sorted(p.name for p in caseops_shards.glob("fineweb_val_bytes_*.bin"))
    assert info["sidecar"]["files"] == sidecars and len(sidecars) > 1
    for name in sidecars:
        assert info["input"]["sha256"][name] == hashlib.sha256((caseops_shards / name).read_bytes()).hexdigest()
    assert info["byte_check"] == {"rule": "byte sidecar", "val_bytes": info["sidecar"]["bytes"], "documents": 50,
                                  "agree": True}


@pytest.mark.parametrize(("damage", "keys", "message"), [
    ("drop", {"text_transform": "caseops"}, "fineweb_val_bytes_000005.bin: byte sidecar missing for fineweb_val_00"),
    ("all", {"text_transform": "caseops"}, "fineweb_val_bytes_000000.bin: byte sidecar not found"),
    ("none", {}, "hold CaseOps markers, but tokenize.text_transform is none"),
    ("marker", {"text_transform": "caseops"}, "for marker id 4: a byte sidecar gives markers 0"),
])
def test_published_caseops_shards_without_a_true_sidecar_are_refused(workdir, caseops_shards, capsys, damage, keys,
                                                                     message):
    sidecars = sorted(caseops_shards.glob("fineweb_val_bytes_*.bin"))
    if damage == "drop":
        sidecars[-1].unlink()
    if damage == "all":
        for path in sidecars:
            path.unlink()
    if damage == "marker":  # 3 bytes given to a TITLE marker: the lookup-table pitfall, in the sidecar
        tokens, counts = read_shard(caseops_shards / "fineweb_val_000000.bin"), np.array(read_shard(sidecars[0]))
        counts[int(np.flatnonzero(tokens == 4)[0])] = 3
        write_shard(sidecars[0], counts)
    assert run(workdir, shards_path=str(caseops_shards), tokenizer_path=str(CASEOPS_MODEL), **keys) == 2
    assert message in capsys.readouterr().err
    assert_no_output(workdir)
