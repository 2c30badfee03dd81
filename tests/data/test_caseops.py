"""CaseOps: parity with the record's own transform, tokenizer and sidecar; exact round trips; malformed text.

The golden numbers are what the record's code computed (``../shared/golden/golden_frontier_tiny.pt``,
README section "Frontier record"); the tokenizer is the record's published one, shipped in
``tests/assets`` (md5 b73929616bf6303b953396b767a29b99, as the golden's ``tokenizer_md5``).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from pgolf.config import TokenizeConfig
from pgolf.data.accounting import load_validation_stream
from pgolf.data.caseops import (
    ALLCAPS,
    CAPNEXT,
    ESC,
    MARKERS,
    TITLE,
    CaseOpsError,
    decode_caseops,
    encode_caseops,
    original_byte_counts,
)
from pgolf.data.corpus import embedded_documents, iter_documents, stdlib_torch_documents
from pgolf.data.dataset import SidecarCheck, build_dataset
from pgolf.data.shards import SIDECAR, read_shard, shard_files
from pgolf.data.tokenizer import TokenizerError, encode_with_surfaces
from tests.conftest import ASSETS_DIR

CASEOPS_TOKENIZER = ASSETS_DIR / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


@functools.cache
def load_frontier(shared_dir: Path) -> dict:
    path = shared_dir / "golden" / "golden_frontier_tiny.pt"
    if not path.is_file():
        pytest.skip(f"{path} is absent: this test needs ../shared beside the checkout (CI has it)")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def frontier(shared_dir) -> dict:
    """What the frontier record's own code computed (../shared/golden/README.md, "Frontier record")."""
    return load_frontier(shared_dir)


@functools.cache
def caseops_tokenizer() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(CASEOPS_TOKENIZER))


def caseops_ids_and_counts(text: str) -> tuple[list[int], list[int]]:
    """What the tokenize stage writes after a validation document's BOS: ids and their byte sidecar."""
    ((ids, surfaces),) = encode_with_surfaces(caseops_tokenizer(), [encode_caseops(text)], 1)
    return ids, original_byte_counts(surfaces)


def test_the_shipped_tokenizer_is_the_records(frontier):
    assert hashlib.md5(CASEOPS_TOKENIZER.read_bytes()).hexdigest() == frontier["tokenizer_md5"]
    sp = caseops_tokenizer()
    assert [sp.piece_to_id(marker) for marker in MARKERS] == [4, 5, 6, 7]
    assert frontier["caseops"]["marker_ids"] == dict(zip(("TITLE", "ALLCAPS", "CAPNEXT", "ESC"), range(4, 8)))
    for marker in MARKERS:  # atomic: a marker is always one token of its own
        assert sp.encode(marker + "abc" + marker) == [sp.piece_to_id(marker), *sp.encode("abc"), sp.piece_to_id(marker)]


def test_documents_match_the_record_exactly(frontier):
    """Transformed text, ids, sidecar and byte total of the 21 real documents, exact."""
    stream_tokens = stream_bytes = 0
    for number, doc in enumerate(frontier["caseops"]["docs"]):
        assert encode_caseops(doc["text"]) == doc["transformed"], number
        assert decode_caseops(doc["transformed"]) == doc["text"], number
        ids, counts = caseops_ids_and_counts(doc["text"])
        assert ids == doc["ids"].tolist(), number
        assert counts == doc["byte_counts"].tolist(), number
        assert sum(counts) == doc["byte_sum"] == doc["utf8_len"] == len(doc["text"].encode("utf-8")), number
        stream_tokens += 1 + len(ids)  # its BOS, which counts 0 bytes
        stream_bytes += sum(counts)
    assert stream_tokens == frontier["caseops"]["stream_tokens"]
    assert stream_bytes == frontier["caseops"]["stream_bytes_total"]


def test_edge_vectors_match_the_record_exactly(frontier):
    for vector in frontier["caseops_vectors"]["vectors"]:
        text = vector["text"]
        assert encode_caseops(text) == vector["transformed"], text
        assert decode_caseops(vector["transformed"]) == text, text
        ((ids, surfaces),) = encode_with_surfaces(caseops_tokenizer(), [vector["transformed"]], 1)
        assert ids == list(vector["ids"]) and surfaces == vector["surfaces"], text
        assert original_byte_counts(surfaces) == vector["byte_counts"], text


def test_whitespace_at_a_documents_ends_belongs_to_no_piece(frontier):
    """docs/BYTES.md: the record's sidecar counts 24 of the 27 bytes; pgolf counts the same (docs/BYTES.md)."""
    (vector,) = [v for v in frontier["caseops_vectors"]["vectors"] if v["text"].startswith("  two")]
    assert sum(vector["byte_counts"]) == 24 and vector["utf8_len"] == 27
    assert sum(caseops_ids_and_counts(vector["text"])[1]) == 24
    assert sum(caseops_ids_and_counts(vector["text"].strip())[1]) == 24  # what is left out is the ends' whitespace


def test_the_records_malformed_texts_are_refused(frontier):
    for text in frontier["caseops_vectors"]["decode_errors"]:
        with pytest.raises(CaseOpsError, match="character"):
            decode_caseops(text)


def test_the_encoder_follows_the_spec():
    assert encode_caseops("The NASA Launch") == f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"
    assert encode_caseops("iPhone") == f"i{CAPNEXT}phone"
    assert encode_caseops("McDonald's") == f"{TITLE}mc{CAPNEXT}donald's"
    assert encode_caseops("I") == encode_caseops("I ")[:-1] == f"{TITLE}i"
    assert encode_caseops("x86 GPUs2") == f"x86 {TITLE}g{CAPNEXT}p{CAPNEXT}us2"
    assert encode_caseops("ÉCOLE") == f"É{ALLCAPS}cole"  # a non-ASCII letter ends no word and starts none
    assert encode_caseops("lower case, digits 42 and ÿ") == "lower case, digits 42 and ÿ"  # identity


@pytest.mark.parametrize(("text", "message"), [
    (f"{TITLE}{TITLE}a", "two word markers"),
    (f"{ALLCAPS}a", "not the canonical"),  # one letter: the encoder writes TITLE
    (f"{TITLE}a{CAPNEXT}b", "not the canonical"),  # "AB": the encoder writes ALLCAPS
    (f"{ALLCAPS}ab{CAPNEXT}c", "all-caps word"),
    ("aBc", "capital letter"),
    (f"{ESC}x", "no marker character"),
    (f"ab{CAPNEXT}", "dangling capitalization marker"),
    (f"{CAPNEXT}a", "start of a word"),
])
def test_text_the_encoder_never_writes_is_refused(text, message):
    with pytest.raises(CaseOpsError, match=message):
        decode_caseops(text)


def random_text(rng: random.Random, length: int) -> str:
    alphabet = "aAbBzZ  \n\t.'-0éÉ℃ﬁ" + "".join(MARKERS)
    return "".join(rng.choice(alphabet) for _ in range(length))


def test_random_text_with_literal_markers_round_trips():
    rng = random.Random(0)
    for _ in range(3000):
        text = random_text(rng, rng.randint(0, 40))
        transformed = encode_caseops(text)
        assert decode_caseops(transformed) == text
        assert not any(c.isascii() and c.isupper() for c in transformed)  # case lives in the markers only
        assert len(original_byte_counts(list(transformed))) == len(transformed)
        assert sum(original_byte_counts(list(transformed))) == len(text.encode("utf-8"))  # one piece per character


def round_trips(texts) -> int:
    count = 0
    for count, text in enumerate(texts, 1):
        assert decode_caseops(encode_caseops(text)) == text, text[:80]
    return count


def test_every_stdlib_document_round_trips():
    assert round_trips(embedded_documents()) > 3000


@pytest.mark.slow
def test_every_stdlib_torch_document_round_trips():
    assert round_trips(stdlib_torch_documents()) > 10000


def test_every_fineweb_sample_document_round_trips(shared_dir):
    assert round_trips(iter_documents(shared_dir / "fineweb" / "docs_sample.jsonl")) == 150


def test_sidecar_sums_to_each_fineweb_sample_documents_bytes(shared_dir):
    """All 150 real documents: the sidecar counts exactly their UTF-8 bytes (none has whitespace at its ends)."""
    for text in iter_documents(shared_dir / "fineweb" / "docs_sample.jsonl"):
        ids, counts = caseops_ids_and_counts(text)
        assert len(counts) == len(ids) and sum(counts) == len(text.encode("utf-8"))


# ------------------------------------------------------------------ the record's shards, through the tokenize stage


def model_documents(frontier: dict, shared_dir: Path) -> list[str]:
    """The golden's loader documents: those lines of the sample, each cut to its recorded length."""
    texts = list(iter_documents(shared_dir / "fineweb" / "docs_sample.jsonl"))
    data = frontier["data"]
    return [texts[i][:n] for i, n in zip(data["model_doc_indices"], data["model_doc_char_lengths"], strict=True)]


@pytest.fixture(scope="module")
def record_shards(frontier, shared_dir, tmp_path_factory) -> Path:
    """The golden's data made by pgolf's tokenize with the published tokenizer: 10 validation documents."""
    work = tmp_path_factory.mktemp("record")
    docs = work / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in model_documents(frontier, shared_dir)))
    cfg = TokenizeConfig(docs_path=str(docs), tokenizer_path=str(CASEOPS_TOKENIZER), num_val_docs=frontier["data"]
                         ["n_val_docs"], shard_size=frontier["data"]["shard_tokens"], text_transform="caseops",
                         num_workers=1)
    (work / "shards").mkdir()
    build_dataset(cfg, work / "model", work / "shards")
    return work / "shards"


def test_shards_and_sidecar_equal_the_records_file_for_file(frontier, record_shards):
    loader = frontier["loader"]
    for split, key in (("val", "val_shards"), ("train", "train_shards"), (SIDECAR, "val_bytes_shards")):
        files = shard_files(record_shards, split)
        assert len(files) == len(loader[key]), split
        for path, expected in zip(files, loader[key], strict=True):
            assert np.array_equal(read_shard(path).astype(np.int64), expected.numpy()), path.name


def test_the_validation_stream_is_the_records(frontier, record_shards):
    """``ValidationData`` of the record: tokens cut to 27 x 128 + 1 and the sidecar at each target."""
    stream = load_validation_stream(record_shards, CASEOPS_TOKENIZER, 8192, seq_len=128)
    assert torch.equal(stream.tokens, frontier["eval"]["val_tokens"].long())
    assert torch.equal(stream.target_bytes, frontier["eval"]["val_bytes"][1:].int())
    assert stream.rule == "byte sidecar"


def test_a_caseops_dataset_is_deterministic(frontier, shared_dir, record_shards, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in model_documents(frontier, shared_dir)))
    build_dataset(TokenizeConfig(docs_path=str(docs), tokenizer_path=str(CASEOPS_TOKENIZER), num_val_docs=10,
                                 shard_size=1500, text_transform="caseops", num_workers=2), tmp_path / "m", again)
    for path in sorted(record_shards.iterdir()):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_fewer_threads_or_batches_do_not_change_counts():
    texts = [f"Doc {i}: The QUICK brown Fox, iPhone {ESC} x" * (i + 1) for i in range(7)]
    transformed = [encode_caseops(text) for text in texts]
    one = [original_byte_counts(s) for _, s in encode_with_surfaces(caseops_tokenizer(), transformed, 1)]
    two = [original_byte_counts(s) for _, s in itertools.chain.from_iterable(
        encode_with_surfaces(caseops_tokenizer(), [encode_caseops(t)], 2) for t in texts)]
    assert one == two and [sum(c) for c in one] == [len(t.encode("utf-8")) for t in texts]


def test_the_sidecar_check_counts_what_pieces_cover_and_names_what_they_do_not():
    texts = ["  Hello WORLD \n", "iPhone", "\n\t "]
    transformed = [encode_caseops(t) for t in texts]
    check = SidecarCheck("caseops.model")
    counts = check.add(texts, transformed, encode_with_surfaces(caseops_tokenizer(), transformed, 1))
    assert [sum(c) for c in counts] == [11, 6, 0]
    assert check.summary() == {"rule": "byte sidecar", "val_bytes": 17, "documents": 3,
                                    "text_bytes": 24, "uncovered_bytes": 7, "agree": True}
    with pytest.raises(TokenizerError, match="caseops.model: validation document 4: the byte sidecar counts 6 bytes "
                                             "but the document has 7"):
        check.add(["iPhone!"], [transformed[1]], encode_with_surfaces(caseops_tokenizer(), [transformed[1]], 1))
    with pytest.raises(TokenizerError, match="validation document 5: its pieces do not cover its text"):
        check.add(["ab cd"], ["ab cd"], [([1, 2], ["ab", "d"])])
