"""The artifact format: shuffle parity, lossless round trips, and clear errors for bad bytes."""

from __future__ import annotations

import json
import lzma
import pickle
import struct
import time
import tracemalloc
import zlib

import brotli
import pytest
import torch
import zstandard

from pgolf.artifact.compress import byte_shuffle, byte_unshuffle, compress, compressed_tensor_sizes, decompress
from pgolf.artifact.format import deserialize, serialize
from pgolf.artifact.load import artifact_model, load_artifact
from pgolf.artifact.tensors import ArtifactError, GroupedTensor, QuantizedModel, QuantizedTensor, dequantize
from pgolf.config import CompressConfig, ModelConfig, QuantizeConfig
from pgolf.quant.fit import quantize_for_size
from tests.quant.test_frontier import frontier_model_with_hessians


def small_model(seed: int = 0) -> QuantizedModel:
    generator = torch.Generator().manual_seed(seed)
    q6 = torch.randint(-31, 32, (12, 20), generator=generator, dtype=torch.int8)
    q8 = torch.randint(-127, 128, (9, 7), generator=generator, dtype=torch.int8)
    return QuantizedModel(
        model_config=ModelConfig(vocab_size=9, num_layers=2, model_dim=7, embedding_dim=7, num_heads=1, num_kv_heads=1,
                                 rope_dims=6, num_loops=0),
        tensors={
            "blocks.0.mlp.fc.weight": QuantizedTensor(q6, torch.rand(12, generator=generator).half(), 6, 12.85),
            "tok_emb.weight": QuantizedTensor(q8, torch.rand(9, generator=generator).half(), 8, 20.0),
            "blocks.0.attn.q_gain": torch.randn(3, generator=generator).half(),  # odd byte count
            "skip_weights": torch.randn(2, 5, generator=generator),  # float32 passthrough
        },
    )


def edit_header(raw: bytes, edit) -> bytes:
    """``raw`` with its JSON header changed by ``edit(header)`` (payload untouched)."""
    _, version, header_len = struct.unpack_from("<4sII", raw)
    header = json.loads(raw[12:12 + header_len])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * ((12 + len(text)) % 2)
    return raw[:4] + struct.pack("<II", version, len(text)) + text + raw[12 + header_len:]


def entry(header: dict, name: str) -> dict:
    return next(e for e in header["tensors"] if e["name"] == name)


# ------------------------------------------------------------------------------ shuffle


def test_byte_shuffle_matches_reference(golden):
    assert byte_shuffle(golden["shuffle_in"], 2) == golden["shuffle_out"]
    assert byte_unshuffle(golden["shuffle_out"]) == golden["shuffle_in"]


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [0, 1, 2, 7, 1000])
def test_byte_shuffle_round_trips(stride, length):
    data = bytes(range(256)) * 4
    data = data[:length]
    shuffled = byte_shuffle(data, stride)
    assert shuffled[:5] == b"BSHF" + bytes([stride])
    assert byte_unshuffle(shuffled) == data


def test_byte_shuffle_groups_even_then_odd_bytes():
    assert byte_shuffle(b"abcdefg", 2)[5:] == b"acegbdf"


def test_unshuffle_without_header_is_an_artifact_error():
    with pytest.raises(ArtifactError, match="BSHF"):
        byte_unshuffle(b"PGQM....")


# -------------------------------------------------------------------- serialize / load


def test_serialize_round_trip_is_exact():
    qm = small_model()
    back = deserialize(serialize(qm))
    assert back.model_config == qm.model_config
    assert list(back.tensors) == list(qm.tensors)
    for name, tensor in qm.tensors.items():
        restored = back.tensors[name]
        if isinstance(tensor, QuantizedTensor):
            assert torch.equal(restored.q, tensor.q) and restored.q.dtype == torch.int8
            assert torch.equal(restored.scale, tensor.scale) and restored.scale.dtype == torch.float16
            assert (restored.bits, restored.clip_sigmas) == (tensor.bits, tensor.clip_sigmas)
        else:
            assert restored.dtype == tensor.dtype and torch.equal(restored, tensor)


def test_serialize_is_deterministic_and_starts_with_magic():
    raw = serialize(small_model())
    assert raw == serialize(small_model())
    assert raw[:4] == b"PGQM"


def test_payload_puts_codes_first_and_16_bit_arrays_at_even_offsets():
    raw = serialize(small_model())
    _, _, header_len = struct.unpack_from("<4sII", raw)
    header = json.loads(raw[12:12 + header_len])
    assert (12 + header_len) % 2 == 0
    codes_end = max(e["offset"] + e["nbytes"] for e in header["tensors"] if e["kind"] == "quantized")
    wide = [(e["offset"]) for e in header["tensors"] if e["kind"] == "passthrough"]
    wide += [e["scale_offset"] for e in header["tensors"] if e["kind"] == "quantized"]
    assert all(offset % 2 == 0 and offset >= codes_end for offset in wide)


def test_dequantize_is_codes_times_row_scale_in_float32():
    qm = small_model()
    state = dequantize(qm)
    fc = qm.tensors["blocks.0.mlp.fc.weight"]
    assert state["blocks.0.mlp.fc.weight"].dtype == torch.float32
    assert torch.equal(state["blocks.0.mlp.fc.weight"][3], fc.q[3].float() * fc.scale[3].float())
    assert torch.equal(state["blocks.0.attn.q_gain"], qm.tensors["blocks.0.attn.q_gain"].float())


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "zstd", "ans", "pergroup"])
def test_compress_round_trip_needs_no_parameters(compressor):
    qm = small_model()
    raw = serialize(qm)
    blob = compress(raw, CompressConfig(compressor=compressor, brotli_quality=5, lzma_preset=1, zstd_level=3))
    assert blob[:4] == b"PGAZ"
    assert decompress(blob) == raw
    restored = dequantize(load_artifact(blob))
    assert all(torch.equal(restored[name], value) for name, value in dequantize(qm).items())


def test_brotli_and_lzma_streams_differ_and_both_shrink_repetitive_data():
    raw = serialize(small_model()) + bytes(20_000)
    brotli_blob = compress(raw, CompressConfig(compressor="brotli"))
    lzma_blob = compress(raw, CompressConfig(compressor="lzma"))
    assert brotli_blob[5] != lzma_blob[5]
    assert len(brotli_blob) < len(raw) // 4 and len(lzma_blob) < len(raw) // 4


def test_shuffle_stride_is_honoured():
    raw = serialize(small_model())
    for stride in (1, 2, 4):
        assert decompress(compress(raw, CompressConfig(shuffle_stride=stride, brotli_quality=1))) == raw


def test_unknown_compressor_is_refused():
    with pytest.raises(ValueError, match="'bzip2'.*brotli, lzma, zstd, ans"):
        compress(b"x", CompressConfig(compressor="bzip2"))


@pytest.mark.parametrize("compressor", ["brotli", "ans", "pergroup"])
def test_compressed_tensor_sizes_cover_every_tensor(compressor):
    sizes = compressed_tensor_sizes(small_model(), CompressConfig(compressor=compressor, brotli_quality=5))
    assert set(sizes) == set(small_model().tensors)
    assert sizes["blocks.0.mlp.fc.weight"] > sizes["blocks.0.attn.q_gain"] > 0


def test_loading_never_unpickles(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading an artifact")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    blob = compress(serialize(small_model()), CompressConfig(brotli_quality=5))
    assert set(load_artifact(blob).tensors) == set(small_model().tensors)


# ---------------------------------------------------------------------- in-memory types


def test_quantized_tensor_rejects_bad_inputs():
    scale = torch.ones(2, dtype=torch.float16)
    with pytest.raises(ValueError, match="int8"):
        QuantizedTensor(torch.zeros(2, 3), scale, 6, 12.85)
    with pytest.raises(ValueError, match="float16"):
        QuantizedTensor(torch.zeros(2, 3, dtype=torch.int8), torch.ones(3, dtype=torch.float16), 6, 12.85)
    with pytest.raises(ValueError, match="31"):
        QuantizedTensor(torch.full((2, 3), 40, dtype=torch.int8), scale, 6, 12.85)
    with pytest.raises(ValueError, match="127"):
        QuantizedTensor(torch.full((2, 3), -128, dtype=torch.int8), scale, 8, 20.0)


def test_grouped_tensor_rejects_bad_inputs():
    codes = torch.zeros(4, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="group size 24 does not divide the 64 codes"):
        GroupedTensor(codes, torch.ones(2, dtype=torch.float16), 4, 24)
    with pytest.raises(ValueError, match=r"float16 \[4\]"):
        GroupedTensor(codes, torch.ones(2, dtype=torch.float16), 4, 16)
    with pytest.raises(ValueError, match="-2..1"):
        GroupedTensor(torch.full((4, 16), 2, dtype=torch.int8), torch.ones(1, dtype=torch.float16), 2, 64)
    assert GroupedTensor(torch.full((4, 16), -2, dtype=torch.int8), torch.ones(1, dtype=torch.float16), 2, 64)
    with pytest.raises(ValueError, match="2..7"):
        GroupedTensor(codes, torch.ones(1, dtype=torch.float16), 8, 64)


def grouped_model() -> QuantizedModel:
    """small_model with an LQER-asym correction of its MLP matrix: A one scale, B a scale per 10 values."""
    generator = torch.Generator().manual_seed(3)
    base = small_model()
    a = GroupedTensor(torch.randint(-2, 2, (12, 2), generator=generator, dtype=torch.int8),
                      torch.rand(1, generator=generator).half(), 2, 24)
    b = GroupedTensor(torch.randint(-8, 8, (2, 20), generator=generator, dtype=torch.int8),
                      torch.rand(4, generator=generator).half(), 4, 10)
    tensors = dict(base.tensors)
    tensors.update({"blocks.0.mlp.fc.weight.lqer_a": a, "blocks.0.mlp.fc.weight.lqer_b": b})
    return QuantizedModel(base.model_config, tensors)


@pytest.mark.parametrize("compressor", ["brotli", "ans", "pergroup"])
def test_grouped_entries_round_trip_and_dequantize_per_group(compressor):
    qm = grouped_model()
    raw = serialize(qm)
    kinds = {e["name"]: e["kind"] for e in json.loads(raw[12:12 + struct.unpack_from("<I", raw, 8)[0]])["tensors"]}
    assert kinds["blocks.0.mlp.fc.weight.lqer_b"] == "grouped" and kinds["blocks.0.mlp.fc.weight"] == "quantized"
    back = load_artifact(compress(raw, CompressConfig(compressor=compressor, brotli_quality=5)))
    b = back.tensors["blocks.0.mlp.fc.weight.lqer_b"]
    assert isinstance(b, GroupedTensor) and torch.equal(b.q, qm.tensors["blocks.0.mlp.fc.weight.lqer_b"].q)
    assert torch.equal(b.dequantize()[1, 10:], b.q[1, 10:].float() * b.scale[3].float())  # the 4th group of 10
    a = back.tensors["blocks.0.mlp.fc.weight.lqer_a"]
    fc = back.tensors["blocks.0.mlp.fc.weight"]
    assert torch.equal(dequantize(back)["blocks.0.mlp.fc.weight"], fc.dequantize() + a.dequantize() @ b.dequantize())


def test_a_grouped_entry_that_disagrees_with_itself_is_refused():
    raw = serialize(grouped_model())
    name = "blocks.0.mlp.fc.weight.lqer_b"
    with pytest.raises(ArtifactError, match="group size 7 does not divide the 40 codes"):
        deserialize(edit_header(raw, lambda h: entry(h, name).update(group_size=7)))
    with pytest.raises(ArtifactError, match=f"'{name}': codes exceed -2..1"):
        deserialize(edit_header(raw, lambda h: entry(h, name).update(bits=2)))
    with pytest.raises(ArtifactError, match=f"'{name}': header entry lacks 'group_size'"):
        deserialize(edit_header(raw, lambda h: entry(h, name).pop("group_size")))


# ------------------------------------------------------------------------ corrupt input


@pytest.fixture(scope="module")
def blob() -> bytes:
    return compress(serialize(small_model()), CompressConfig(brotli_quality=5))


@pytest.mark.parametrize("cut", [0, 3, 17, 30, -1])
def test_truncated_artifact(blob, cut):
    with pytest.raises(ArtifactError, match="truncated"):
        load_artifact(blob[:cut])


def test_wrong_artifact_magic(blob):
    with pytest.raises(ArtifactError, match="magic b'XXAZ'"):
        load_artifact(b"XXAZ" + blob[4:])


def test_wrong_artifact_version(blob):
    with pytest.raises(ArtifactError, match="version 9 is not supported"):
        load_artifact(blob[:4] + bytes([9]) + blob[5:])


def test_unknown_compressor_id(blob):
    with pytest.raises(ArtifactError, match="unknown compressor id 7"):
        load_artifact(blob[:5] + bytes([7]) + blob[6:])


def test_unsupported_coder_version(blob):
    with pytest.raises(ArtifactError, match="brotli coder version 9 is not supported"):
        load_artifact(blob[:6] + bytes([9]) + blob[7:])


@pytest.mark.parametrize("compressor", [1, 2])
def test_version_1_artifacts_still_load(compressor):
    """Artifacts written before the coder version byte: ``PGAZ | 1 | compressor | raw_len | crc``."""
    raw = serialize(small_model())
    shuffled = byte_shuffle(raw, 2)
    stream = brotli.compress(shuffled) if compressor == 1 else lzma.compress(shuffled)
    old = b"PGAZ" + struct.pack("<BBQI", 1, compressor, len(raw), zlib.crc32(raw)) + stream
    assert decompress(old) == raw


def test_version_1_knows_only_brotli_and_lzma():
    raw = serialize(small_model())
    old = b"PGAZ" + struct.pack("<BBQI", 1, 4, len(raw), zlib.crc32(raw)) + b"...."
    with pytest.raises(ArtifactError, match="unknown compressor id 4 for version 1"):
        decompress(old)


def bomb(compressor: str, inflated: int) -> bytes:
    """An artifact declaring a 1,000-byte model whose stream inflates to ``inflated`` zero bytes."""
    data = b"BSHF\x02" + bytes(inflated)
    stream = {"brotli": lambda: brotli.compress(data, quality=5), "lzma": lambda: lzma.compress(data, preset=1),
              "zstd": lambda: zstandard.ZstdCompressor(level=3).compress(data)}[compressor]()
    return b"PGAZ" + struct.pack("<BBBQI", 2, {"brotli": 1, "lzma": 2, "zstd": 3}[compressor], 1, 1000, 0) + stream


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "zstd"])
def test_decompression_stops_at_the_declared_length(compressor):
    inflated = 64 << 20
    blob = bomb(compressor, inflated)
    assert len(blob) < inflated // 1000
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match=f"{compressor} stream inflates beyond the 1,005 bytes"):
        decompress(blob)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 << 20, f"decompressing the bomb allocated {peak:,} bytes"
    assert seconds < 5, f"refusing the bomb took {seconds:.1f} s"


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "zstd"])
def test_streams_of_many_pieces_round_trip(compressor):
    """Several MiB of stream and output: bounded decompression feeds and drains it piece by piece."""
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(-127, 128, (3072, 1024), generator=generator, dtype=torch.int8)
    model = QuantizedModel(small_model().model_config, {"w": QuantizedTensor(codes, torch.ones(3072).half(), 8, 20.0),
                                                        "z": torch.zeros(2 << 20, dtype=torch.float16)})
    raw = serialize(model)
    blob = compress(raw, CompressConfig(compressor=compressor, brotli_quality=1, lzma_preset=0, zstd_level=1))
    assert len(blob) > 2 << 20 and decompress(blob) == raw
    with pytest.raises(ArtifactError, match="truncated"):
        decompress(blob[:len(blob) // 2])


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "zstd"])
def test_stream_shorter_than_declared_is_refused(compressor):
    raw = serialize(small_model())
    blob = compress(raw, CompressConfig(compressor=compressor, brotli_quality=5, lzma_preset=1, zstd_level=3))
    longer = blob[:7] + struct.pack("<Q", len(raw) + 10) + blob[15:]
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        decompress(longer)


def test_flipped_bits_in_stream(blob):
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0xFF
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(bytes(damaged))


@pytest.mark.parametrize("size", [18, 100, 5000])
def test_garbage_is_an_artifact_error(size):
    generator = torch.Generator().manual_seed(size)
    garbage = bytes(torch.randint(0, 256, (size,), generator=generator, dtype=torch.uint8).tolist())
    with pytest.raises(ArtifactError):
        load_artifact(garbage)
    with pytest.raises(ArtifactError):
        load_artifact(b"PGAZ\x01\x01" + garbage)


def test_wrong_model_magic_and_version():
    raw = serialize(small_model())
    with pytest.raises(ArtifactError, match="not a serialized pgolf model"):
        deserialize(b"ABCD" + raw[4:])
    with pytest.raises(ArtifactError, match="version 2 is not supported"):
        deserialize(raw[:4] + struct.pack("<I", 2) + raw[8:])


def test_truncated_serialized_model():
    raw = serialize(small_model())
    with pytest.raises(ArtifactError, match="truncated"):
        deserialize(raw[:8])
    with pytest.raises(ArtifactError, match="header needs"):
        deserialize(raw[:40])
    with pytest.raises(ArtifactError, match="beyond the payload"):
        deserialize(raw[:-3])


def test_declared_size_disagreeing_with_shape():
    raw = edit_header(serialize(small_model()), lambda h: entry(h, "blocks.0.mlp.fc.weight").update(nbytes=100))
    with pytest.raises(ArtifactError, match=r"'blocks.0.mlp.fc.weight': declared 100 bytes but shape \[12, 20\]"):
        deserialize(raw)


def test_shape_larger_than_the_data():
    raw = edit_header(
        serialize(small_model()), lambda header: entry(header, "skip_weights").update(shape=[2000, 5], nbytes=40000)
    )
    with pytest.raises(ArtifactError, match="'skip_weights'.*beyond the payload"):
        deserialize(raw)


def test_unknown_dtype():
    raw = edit_header(serialize(small_model()), lambda h: entry(h, "skip_weights").update(dtype="complex64"))
    with pytest.raises(ArtifactError, match="'skip_weights': unknown dtype 'complex64'"):
        deserialize(raw)


def test_codes_out_of_range_for_their_bits():
    raw = edit_header(serialize(small_model()), lambda h: entry(h, "tok_emb.weight").update(bits=4))
    with pytest.raises(ArtifactError, match="'tok_emb.weight': codes exceed"):
        deserialize(raw)


def test_missing_header_field_and_unknown_model_key():
    raw = serialize(small_model())
    with pytest.raises(ArtifactError, match="lacks 'scale_offset'"):
        deserialize(edit_header(raw, lambda h: entry(h, "tok_emb.weight").pop("scale_offset")))
    with pytest.raises(ArtifactError, match="model_config: unknown key"):
        deserialize(edit_header(raw, lambda h: h["model_config"].update(depth=3)))


def test_header_not_json():
    raw = serialize(small_model())
    _, _, header_len = struct.unpack_from("<4sII", raw)
    broken = raw[:12] + b"{" * header_len + raw[12 + header_len:]
    with pytest.raises(ArtifactError, match="header is not JSON"):
        deserialize(broken)


QUANTIZE_METHODS = {
    "sdclip": {},
    "hessian_sdclip": {"scale_search": "hessian_sdclip"},
    "gate_int8": {"gate_int8": True},
    "gate_int8_attn_gate_w": {"gate_int8": True, "gate_rule": "attn_gate_w"},
    "lqer": {"lqer_rank": 4, "lqer_max_tensors": 2},
    "lqer_asym": {"lqer_rank": 4, "lqer_max_tensors": 3, "lqer_mode": "asym", "lqer_group": 64},
    "lqer_asym_fallback": {"lqer_rank": 3, "lqer_max_tensors": 2, "lqer_mode": "asym", "lqer_group": 256},
    "allocate": {"method": "allocate", "allocate_bits": [5, 8], "allocate_clip_sigmas": [12.85], "lqer_rank": 2},
}


@pytest.mark.parametrize("compressor", ["brotli", "ans", "pergroup"])
@pytest.mark.parametrize("method", sorted(QUANTIZE_METHODS))
def test_every_quantization_method_round_trips_through_the_artifact(method, compressor, tmp_path):
    model, hessians = frontier_model_with_hessians()
    cfg = QuantizeConfig(passthrough_max_numel=0, **QUANTIZE_METHODS[method])
    compress_cfg = CompressConfig(compressor=compressor, brotli_quality=5, size_limit_bytes=400_000)
    qm, _, _ = quantize_for_size(model.config, model.state_dict(), hessians, cfg,
                                 compress_cfg if cfg.method == "allocate" else None, 0, "cpu")
    kinds = {type(tensor).__name__ for tensor in qm.tensors.values()}
    assert ("GroupedTensor" in kinds) == (method == "lqer_asym" or method == "lqer_asym_fallback")
    if method == "gate_int8_attn_gate_w":  # the record's rule: the attention gates, not skip_gates
        assert isinstance(qm.tensors["blocks.0.attn.attn_gate_w"], QuantizedTensor)
        assert not isinstance(qm.tensors["skip_gates"], QuantizedTensor)
    blob = compress(serialize(qm), compress_cfg)
    path = tmp_path / "model.ptz"
    path.write_bytes(blob)
    loaded = artifact_model(path)
    expected = dequantize(qm)
    assert set(expected) == set(model.state_dict())
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name
