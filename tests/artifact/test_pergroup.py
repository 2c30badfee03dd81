"""Per-group lrzip (PR #1855's ``COMPRESSOR=pergroup``): the record's layout byte for byte, exact round
trips, and bounded, clear failures (the lrzip program itself: ``test_lrzip.py``).

Parity with ``../shared/golden/golden_frontier_tiny.pt`` (README "Frontier record"): ``pergroup_tiny``
(the tiny model's codes) and ``pergroup_mixed`` (``quant_mixed``'s, LQER factors and gate codes
included) give each group's members, the raw bytes of each group before lrzip (length and sha256),
the row permutations and the container's header length, all exact; lrzip's stream lengths depend on
lrzip's version and are compared only under the golden's (0.651).
"""

from __future__ import annotations

import hashlib
import struct
import subprocess

import numpy as np
import pytest
import torch

from pgolf.artifact import lrzip, pergroup
from pgolf.artifact.compress import compress, decompress
from pgolf.artifact.format import serialize, split_header
from pgolf.artifact.load import load_artifact
from pgolf.artifact.size import SizeLimitError, pack_artifact
from pgolf.artifact.tensors import ArtifactError, GroupedTensor, QuantizedModel, QuantizedTensor, dequantize
from pgolf.config import CompressConfig, ModelConfig
from stages.import_model import unbank_state_dict
from tests.conftest import _load, _require
from tests.model.test_frontier import GOLDEN, frontier_config

PERGROUP = CompressConfig(compressor="pergroup")
PREFIX = 19  # the artifact's: b"PGAZ" | u8 version | u8 compressor | u8 coder version | u64 raw_len | u32 crc32
GOLDEN_LRZIP = "lrzip version 0.651"


@pytest.fixture(scope="module")
def golden() -> dict:
    return _load(_require(GOLDEN))


def record_model(result: dict, state: dict[str, torch.Tensor], model_config: ModelConfig) -> QuantizedModel:
    """The record's ``quant_result`` (codes ``.q``/``.scale``, gates ``.gq``/``.gs``, LQER ``.lqA_a``...)
    as pgolf's quantized model of ``state``'s tensors (the rest fp16)."""
    tensors: dict = {}
    for name, weight in state.items():
        if f"{name}.q" in result:
            tensors[name] = QuantizedTensor(result[f"{name}.q"], result[f"{name}.scale"], 6, 0.0)
        elif f"{name}.gq" in result:
            tensors[name] = QuantizedTensor(result[f"{name}.gq"], result[f"{name}.gs"], 8, 0.0)
        else:
            tensors[name] = weight.half()
        for factor, (codes, scales, bits) in {"lqer_a": ("lqA_a", "lqAs_a", 2), "lqer_b": ("lqB_a", "lqBs_a", 4)}.items():
            if f"{name}.{codes}" in result:
                q, s = result[f"{name}.{codes}"], result[f"{name}.{scales}"].reshape(-1)
                tensors[f"{name}.{factor}"] = GroupedTensor(q, s, bits, q.numel() // s.numel())
    return QuantizedModel(model_config, tensors)


def tiny_model(golden: dict) -> QuantizedModel:
    result = {}
    for name, entry in golden["quant_tiny"]["gptq"].items():
        result.update({f"{name}.{key}": value for key, value in entry.items() if torch.is_tensor(value)})
    return record_model(result, unbank_state_dict(golden["state_dict"]), frontier_config(golden["config"]))


def mixed_model(golden: dict) -> QuantizedModel:
    mixed = golden["quant_mixed"]
    return record_model(mixed["result"], mixed["state_dict"], ModelConfig())


def lrzip_version() -> str:
    return subprocess.run(["lrzip", "-V"], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("case", ["pergroup_tiny", "pergroup_mixed"])
def test_groups_blobs_and_permutations_are_the_records(golden, case):
    expected = golden[case]
    raw = serialize(tiny_model(golden) if case == "pergroup_tiny" else mixed_model(golden))
    start, header = split_header(raw)
    layout = pergroup.model_layout(header, start, len(raw) - start)
    record_key = {key: ("_" if key in pergroup.TOP_LEVEL_GROUPS else "") + key + ".q" for key in pergroup.GROUPS}
    assert [record_key[key] for key in pergroup.GROUPS] == expected["group_order"]
    assert {record_key[key] for key in pergroup.SORTED_GROUPS} == set(expected["simsort_groups"])
    members = {record_key[key]: [m.name + ".q" for m in group] for key, group in zip(pergroup.GROUPS, layout.groups)
               if group}
    assert members == expected["groups"]
    assert {record_key[key]: [[m.rows, m.cols] for m in group] for key, group in zip(pergroup.GROUPS, layout.groups)
            if group} == expected["shape_manifest"]
    parts = pergroup.split_model(raw)
    for key, blob in zip(pergroup.GROUPS, parts.groups):
        blobs = expected["raw_group_blobs"].get(record_key[key].replace(".", "_"))
        if blobs is None:
            assert blob == b"", key
        else:
            assert (len(blob), hashlib.sha256(blob).hexdigest()) == (blobs["raw_len"], blobs["raw_sha256"]), key
    assert len(parts.permutations) == expected["perms_raw_len"]
    if "perms_uint16" in expected:
        assert np.array_equal(np.frombuffer(parts.permutations, "<u2"), expected["perms_uint16"].numpy())
    assert len(pergroup.pack_streams([b""] * pergroup.STREAM_COUNT)) == expected["header_len"]


def test_the_l1_chain_is_the_records(golden):
    gptq = golden["quant_tiny"]["gptq"]
    for name, order in golden["pergroup_tiny"]["similarity_sort"].items():
        assert np.array_equal(pergroup.l1_chain(gptq[name[:-2]]["q"].numpy()), order.numpy()), name


@pytest.mark.parametrize("case", ["pergroup_tiny", "pergroup_mixed"])
def test_the_records_models_round_trip_and_lrzip_streams_match_its_version(golden, case):
    qm = tiny_model(golden) if case == "pergroup_tiny" else mixed_model(golden)
    raw = serialize(qm)
    blob = compress(raw, PERGROUP)
    assert decompress(blob) == raw
    if case == "pergroup_mixed":  # the same model, the same bytes (the golden's second_run_identical)
        assert compress(raw, PERGROUP) == blob
    restored, expected_state = dequantize(load_artifact(blob)), dequantize(qm)
    assert restored.keys() == expected_state.keys()
    assert all(torch.equal(restored[name], value) for name, value in expected_state.items())
    streams = pergroup.unpack_streams(blob[PREFIX:])  # after the PGAZ prefix
    if lrzip_version() == GOLDEN_LRZIP:
        assert [len(s) for s in streams[:pergroup.REMAINDER]] == golden[case]["stream_lengths"][:pergroup.REMAINDER]


def test_chain_order_ties_go_to_the_lowest_row_and_the_permutation_inverts():
    codes = np.array([[0, 0], [5, 5], [1, 0], [0, 1], [5, 4], [1, 0]], dtype=np.int8)
    order = pergroup.l1_chain(codes)
    assert order.tolist() == [0, 2, 5, 3, 4, 1]  # rows 2, 3 tie at 1 from row 0: 2 first; row 5 repeats 2
    generator = np.random.default_rng(0)
    big = generator.integers(-31, 32, size=(8192, 4), dtype=np.int8)
    order = pergroup.l1_chain(big)
    assert sorted(order.tolist()) == list(range(8192))
    stored = order.astype("<u2")  # 8,192 rows fit the uint16 entries
    restored = np.empty_like(big)
    restored[stored.astype(np.int64)] = big[order]
    assert np.array_equal(restored, big)


def test_a_sorted_matrix_beyond_uint16_rows_is_refused():
    header = {"tensors": [{"name": "tok_emb.weight", "kind": "quantized", "dtype": "int8", "shape": [65537, 1],
                           "offset": 0, "nbytes": 65537}]}
    with pytest.raises(ArtifactError, match="more than 65,536 rows"):
        pergroup.model_layout(header, 0, 70_000)


def small_model() -> QuantizedModel:
    """An embedding and one block's MLP: two groups, one of them sorted."""
    generator = torch.Generator().manual_seed(0)
    codes = lambda rows, cols: torch.randint(-3, 4, (rows, cols), generator=generator, dtype=torch.int8)
    return QuantizedModel(ModelConfig(), {
        "tok_emb.weight": QuantizedTensor(codes(64, 16), torch.rand(64, generator=generator).half(), 6, 12.0),
        "blocks.0.mlp.proj.weight": QuantizedTensor(codes(16, 48), torch.rand(16, generator=generator).half(), 6, 12.0),
        "skip_gates": torch.randn(2, 16, generator=generator).half(),
    })


def test_missing_lrzip_is_a_clear_error_never_a_fallback(monkeypatch):
    raw = serialize(small_model())
    blob = compress(raw, PERGROUP)
    monkeypatch.setattr(lrzip.shutil, "which", lambda name: None)
    for action in (lambda: compress(raw, PERGROUP), lambda: decompress(blob)):
        with pytest.raises(lrzip.LrzipMissingError, match=r"Debian/Ubuntu package 'lrzip' \(apt-get install lrzip\)"):
            action()


def test_pack_artifact_gates_the_pergroup_size():
    raw = serialize(small_model())
    blob = pack_artifact(raw, PERGROUP, code=1_000)
    with pytest.raises(SizeLimitError, match="over the limit"):
        pack_artifact(raw, CompressConfig(compressor="pergroup", size_limit_bytes=len(blob) + 999), code=1_000)


# ------------------------------------------------------------------------------- corrupt input


@pytest.fixture(scope="module")
def mixed_blob(golden) -> tuple[bytes, bytes]:
    raw = serialize(mixed_model(golden))
    return raw, compress(raw, PERGROUP)


def rebuild(blob: bytes, streams: list[bytes]) -> bytes:
    return blob[:PREFIX] + pergroup.pack_streams(streams)


def test_an_lrzip_stream_declaring_another_size_is_refused_before_lrzip_runs(mixed_blob, monkeypatch):
    _, blob = mixed_blob
    streams = pergroup.unpack_streams(blob[PREFIX:])
    streams[0] = streams[0][:6] + struct.pack("<Q", 1 << 40) + streams[0][14:]
    with pytest.raises(ArtifactError, match="lrzip stream declares 1099511627776 bytes, expected 70,400"):
        decompress(rebuild(blob, streams))
    monkeypatch.setattr(lrzip.subprocess, "Popen", lambda *args, **kwargs: pytest.fail("lrzip ran"))
    with pytest.raises(ArtifactError, match="declares"):
        lrzip.lrzip_decompress(streams[0], 70_400)


@pytest.mark.parametrize("stream", [0, pergroup.REMAINDER, pergroup.PERMUTATIONS])
def test_truncated_streams_are_artifact_errors(mixed_blob, stream):
    _, blob = mixed_blob
    streams = pergroup.unpack_streams(blob[PREFIX:])
    streams[stream] = streams[stream][: len(streams[stream]) // 2]
    with pytest.raises(ArtifactError, match="corrupt|truncated"):
        decompress(rebuild(blob, streams))


def test_a_permutation_that_is_not_one_is_refused(mixed_blob):
    raw, _ = mixed_blob
    parts = pergroup.split_model(raw)
    start, header = split_header(parts.remainder)
    layout = pergroup.model_layout(header, start, len(raw) - start)
    broken = bytes(len(parts.permutations))  # every row says 0
    with pytest.raises(ArtifactError, match="not a permutation"):
        pergroup.join_model(parts.remainder, layout, parts.groups, broken)
    assert pergroup.join_model(parts.remainder, layout, parts.groups, parts.permutations) == raw


def test_a_container_that_does_not_add_up_is_refused(mixed_blob):
    _, blob = mixed_blob
    with pytest.raises(ArtifactError, match="do not add up"):
        decompress(blob + b"x")
    with pytest.raises(ArtifactError, match="holds 8 streams"):
        decompress(blob[:PREFIX] + b"PGRP" + struct.pack("<I", 8) + blob[27:])
