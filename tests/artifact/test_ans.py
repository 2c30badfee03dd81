"""The ``ans`` coder: exact round trips on every tensor kind, determinism, size, and named errors."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import brotli
import numpy as np
import pytest
import torch

from pgolf.artifact import ans
from pgolf.artifact.compress import compress, decompress
from pgolf.artifact.format import serialize, split_header
from pgolf.artifact.load import load_artifact
from pgolf.artifact.tensors import ArtifactError, QuantizedModel, QuantizedTensor
from pgolf.config import CompressConfig, ModelConfig

ANS = CompressConfig(compressor="ans")
CONFIG = ModelConfig(vocab_size=9, num_layers=2, model_dim=7, embedding_dim=7, num_heads=1, num_kv_heads=1, rope_dims=6,
                     num_loops=0)


def gaussian_codes(rows: int, cols: int, bits: int, generator: torch.Generator, widths: torch.Tensor | None = None):
    """Rounded Gaussian codes (std ``widths`` per column, default qmax / 4), clamped to ``bits``."""
    qmax = 2 ** (bits - 1) - 1
    widths = torch.full((cols,), qmax / 4) if widths is None else widths
    q = (torch.randn(rows, cols, generator=generator) * widths[None, :]).round().clamp(-qmax, qmax)
    return QuantizedTensor(q.to(torch.int8), (torch.rand(rows, generator=generator) * 1e-2).half(), bits, 12.85)


def repeated_rows(generator: torch.Generator, rows: int = 96, copies: int = 64, cols: int = 40) -> QuantizedTensor:
    """int8 codes whose last ``copies`` rows each repeat an earlier row (copies of copies too), a few codes off."""
    q = (torch.randn(rows + copies, cols, generator=generator) * 6).round().clamp(-127, 127)
    for row in range(rows, rows + copies):
        source = int(torch.randint(0, row, (1,), generator=generator))
        noise = (torch.rand(cols, generator=generator) < 0.2).float() * torch.randn(cols, generator=generator).sign()
        q[row] = (q[source] + noise).clamp(-127, 127)
    return QuantizedTensor(q.to(torch.int8), torch.full((rows + copies,), 0.01).half(), 8, 20.0)


def every_kind(seed: int = 0) -> QuantizedModel:
    """Codes of 2..8 bits, empty and constant tensors, fp16 and fp32 passthrough."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, QuantizedTensor | torch.Tensor] = {
        f"codes{bits}": gaussian_codes(33, 47, bits, generator) for bits in range(2, 9)
    }
    tensors["full_range8"] = QuantizedTensor(
        torch.randint(-127, 128, (16, 16), generator=generator, dtype=torch.int8), torch.ones(16).half(), 8, 1.0
    )
    tensors["zero_codes"] = QuantizedTensor(torch.zeros(5, 6, dtype=torch.int8), torch.zeros(5).half(), 6, 12.85)
    tensors["max_codes"] = QuantizedTensor(torch.full((3, 4), -31, dtype=torch.int8), torch.ones(3).half(), 6, 12.85)
    tensors["no_rows"] = QuantizedTensor(torch.zeros(0, 8, dtype=torch.int8), torch.zeros(0).half(), 6, 12.85)
    tensors["no_cols"] = QuantizedTensor(torch.zeros(4, 0, dtype=torch.int8), torch.ones(4).half(), 5, 12.85)
    tensors["one_code"] = QuantizedTensor(torch.tensor([[3]], dtype=torch.int8), torch.ones(1).half(), 5, 12.85)
    tensors["repeats"] = repeated_rows(generator)
    tensors["gains16"] = torch.randn(3, generator=generator).half()
    tensors["gains32"] = torch.randn(2, 5, generator=generator)
    tensors["const16"] = torch.full((64,), 1.5).half()
    tensors["const32"] = torch.zeros(7)
    tensors["empty16"] = torch.zeros(0).half()
    tensors["empty32"] = torch.zeros(0, 3)
    tensors["special16"] = torch.tensor([float("inf"), -0.0, float("nan"), 6.0e-8, 65504.0]).half()
    return QuantizedModel(model_config=CONFIG, tensors=tensors)


@pytest.fixture(scope="module")
def raw() -> bytes:
    return serialize(every_kind())


@pytest.fixture(scope="module")
def blob(raw) -> bytes:
    return compress(raw, ANS)


def test_round_trip_is_exact_on_every_tensor_kind(raw, blob):
    assert decompress(blob) == raw
    restored = load_artifact(blob)
    for name, tensor in every_kind().tensors.items():
        back = restored.tensors[name]
        if isinstance(tensor, QuantizedTensor):
            assert torch.equal(back.q, tensor.q) and torch.equal(back.scale.view(torch.int16), tensor.scale.view(torch.int16))
            assert (back.bits, back.clip_sigmas) == (tensor.bits, tensor.clip_sigmas)
        else:
            assert back.dtype == tensor.dtype and back.shape == tensor.shape
            assert back.numpy().tobytes() == tensor.numpy().tobytes()  # bit-exact, NaN included


def test_a_model_without_tensors_round_trips():
    raw = serialize(QuantizedModel(model_config=CONFIG, tensors={}))
    assert decompress(compress(raw, ANS)) == raw


def test_header_names_the_coder_and_its_version(blob):
    magic, version, compressor, coder_version = struct.unpack_from("<4sBBB", blob)
    assert (magic, version, compressor, coder_version) == (b"PGAZ", 2, 4, ans.CODER_VERSION)


def test_output_is_deterministic(raw, blob):
    assert compress(raw, ANS) == blob
    assert compress(serialize(every_kind()), ANS) == blob


def test_stream_bytes_are_pinned():
    """The same arrays give the same bytes on every machine: the stream of fixed arrays is fixed."""
    generator = torch.Generator().manual_seed(1)
    codes = gaussian_codes(64, 40, 6, generator, torch.linspace(0.5, 6.0, 40))
    repeats = repeated_rows(generator)
    arrays = [codes.q.numpy(), codes.scale.numpy(), repeats.q.numpy(), repeats.scale.numpy(), np.ones(5, np.float32)]
    roles = [("codes", "int8", 6), ("scale", "float16", 0), ("codes", "int8", 8), ("scale", "float16", 0),
             ("passthrough", "float32", 0)]
    specs, offset = [], 0
    for array, (role, dtype, bits) in zip(arrays, roles):
        specs.append(ans.ArraySpec(role, dtype, array.shape, offset, bits))
        offset += array.nbytes
    payload = b"".join(array.tobytes() for array in arrays)
    stream = ans.encode_model(b"a fixed header", specs, memoryview(payload))
    assert hashlib.sha256(stream).hexdigest()[:16] == PINNED_DIGEST, hashlib.sha256(stream).hexdigest()[:16]
    head, body = ans.decode_head(stream)
    assert head == b"a fixed header" and ans.decode_payload(body, specs, len(payload)) == payload


PINNED_DIGEST = "13cd3eb39d3f24f1"


def test_columns_of_different_widths_cost_less_than_brotli():
    """Trained matrices differ by input channel; the column classes turn that into bytes saved."""
    generator = torch.Generator().manual_seed(2)
    widths = 2.0 ** (torch.randn(512, generator=generator) * 0.5) * 2.5  # per-column std, log-normal
    model = QuantizedModel(CONFIG, {"w": gaussian_codes(256, 512, 6, generator, widths)})
    raw = serialize(model)
    ans, brotli11 = len(compress(raw, ANS)), len(compress(raw, CompressConfig(compressor="brotli")))
    assert ans < 0.97 * brotli11, (ans, brotli11)


def test_rows_repeating_earlier_rows_are_coded_as_differences():
    generator = torch.Generator().manual_seed(4)
    tensor = repeated_rows(generator)
    predicted, references = ans._references(tensor.q.numpy())
    assert set(predicted.tolist()) == set(range(96, 160)) and np.all(references < predicted)
    fresh = QuantizedTensor((torch.randn(160, 40, generator=generator) * 6).round().to(torch.int8), tensor.scale, 8, 20.0)
    with_repeats, without = (len(compress(serialize(QuantizedModel(CONFIG, {"e": t})), ANS)) for t in (tensor, fresh))
    assert with_repeats < 0.8 * without, (with_repeats, without)


def test_scales_under_a_bell_round_trip_and_beat_brotli():
    generator = torch.Generator().manual_seed(5)
    scales = [(torch.randn(n, generator=generator) * 1e-4 + 2e-3).half() for n in (512, 1, 300)]
    data = b"".join(scale.numpy().tobytes() for scale in scales)
    counts = [len(scale) for scale in scales]
    section = ans._encode_bytes(data, 2, counts)
    method, size = struct.unpack_from("<BI", section)
    assert method == ans.BELL and size < len(brotli.compress(data, quality=11))
    assert ans._decode_bytes(method, memoryview(section)[5:], len(data), 2, "test", counts) == data


def test_incompressible_passthrough_is_stored_raw():
    generator = torch.Generator().manual_seed(3)
    noise = torch.randint(-(2**15), 2**15, (4096,), generator=generator, dtype=torch.int32).to(torch.int16)
    raw = serialize(QuantizedModel(CONFIG, {"noise": noise.view(torch.float16)}))
    assert len(compress(raw, ANS)) < len(raw) + 64


def test_only_a_serialized_model_can_be_coded(raw):
    with pytest.raises(ArtifactError, match="not a serialized pgolf model"):
        compress(b"PGXX" + bytes(40), ANS)
    with pytest.raises(ValueError, match="bytes between or after its arrays"):
        compress(raw + bytes(2), ANS)


# ------------------------------------------------------------------------ damaged input


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 0.8, 0.99])
def test_flipped_bit_is_an_artifact_error(blob, fraction):
    damaged = bytearray(blob)
    damaged[int(len(blob) * fraction)] ^= 0x10
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(bytes(damaged))


@pytest.mark.parametrize("keep", [20, 30, 100, 0.5, -4, -1])
def test_truncated_stream_is_an_artifact_error(blob, keep):
    cut = int(len(blob) * keep) if isinstance(keep, float) else keep
    with pytest.raises(ArtifactError, match="truncated"):
        load_artifact(blob[:cut])


def test_wrong_coder_id_is_an_artifact_error(blob):
    with pytest.raises(ArtifactError, match="unknown compressor id 9"):
        load_artifact(blob[:5] + bytes([9]) + blob[6:])
    with pytest.raises(ArtifactError, match="brotli stream is corrupt"):
        load_artifact(blob[:5] + bytes([1]) + blob[6:])  # an ans stream read as brotli


def test_wrong_coder_version_is_an_artifact_error(blob):
    with pytest.raises(ArtifactError, match=f"ans coder version 7 is not supported \\(this code reads {ans.CODER_VERSION}\\)"):
        load_artifact(blob[:6] + bytes([7]) + blob[7:])


@pytest.mark.parametrize("bit", [3, 40, 62])
def test_flipped_bit_in_the_declared_length_is_refused_before_decoding(blob, bit):
    (raw_len,) = struct.unpack_from("<Q", blob, 7)
    damaged = blob[:7] + struct.pack("<Q", raw_len ^ (1 << bit)) + blob[15:]
    # a shorter length puts the header's arrays past the end, a longer one past the last array
    with pytest.raises(ArtifactError, match="arrays end at byte|lies beyond the payload|more than such an artifact may"):
        load_artifact(damaged)


def test_declared_length_bounds_the_output(raw, blob):
    shorter = blob[:7] + struct.pack("<Q", len(raw) // 2) + blob[15:]
    with pytest.raises(ArtifactError, match="ans stream is corrupt or truncated"):
        load_artifact(shorter)


def declaring(rows: int, cols: int) -> bytes:
    """An ans artifact of a few hundred bytes whose header declares a [rows, cols] code matrix: a real artifact of an
    8x8 matrix with its model header rewritten (shape, extents, raw length), its coded sections as they were."""
    generator = torch.Generator().manual_seed(7)
    blob = compress(serialize(QuantizedModel(CONFIG, {"w": gaussian_codes(8, 8, 6, generator)})), ANS)
    prefix = struct.Struct("<4sBBBQI")  # magic, version, compressor, coder version, raw_len, crc32
    magic, version, compressor, coder, _, crc = prefix.unpack_from(blob)
    head, body = ans.decode_head(blob[prefix.size:])
    _, header = split_header(head)
    scale_offset = rows * cols + rows * cols % 2
    header["tensors"][0].update(shape=[rows, cols], nbytes=rows * cols, scale_offset=scale_offset, scale_nbytes=2 * rows)
    text = json.dumps(header).encode()
    head = struct.pack("<4sII", b"PGQM", 1, len(text)) + text
    return (prefix.pack(magic, version, compressor, coder, len(head) + scale_offset + 2 * rows, crc)
            + ans._encode_bytes(head, 1) + bytes(body))


PEAK = """
import resource, sys
from pathlib import Path
from pgolf.artifact.load import load_artifact
from pgolf.artifact.tensors import ArtifactError
blob = Path(sys.argv[1]).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_artifact(blob)
    outcome = "loaded"
except ArtifactError as exc:
    outcome = f"refused: {exc}"
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, outcome)
"""


def peak_of_loading(blob: bytes, tmp_path: Path) -> tuple[int, str]:
    """The peak resident memory (KiB) that loading ``blob`` adds in a fresh process, and what became of it."""
    path = tmp_path / f"artifact-{hashlib.sha256(blob).hexdigest()[:8]}.ptz"
    path.write_bytes(blob)
    done = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    added, outcome = done.stdout.split(" ", 1)
    return int(added), outcome.strip()


@pytest.mark.parametrize("rows, cols", [(1 << 15, 1 << 15), (1 << 20, 1 << 20)], ids=["1GiB", "1TiB"])
def test_a_declared_size_beyond_what_the_bytes_hold_is_refused_within_a_normal_loads_memory(tmp_path, rows, cols):
    """A few hundred bytes declaring a 1 GiB or a 1 TiB matrix (far beyond this machine's memory) are refused, named,
    before anything of that size is allocated: the peak memory stays within 16 MiB of loading an honest artifact."""
    generator = torch.Generator().manual_seed(7)
    honest = compress(serialize(QuantizedModel(CONFIG, {"w": gaussian_codes(8, 8, 6, generator)})), ANS)
    normal, outcome = peak_of_loading(honest, tmp_path)
    assert outcome == "loaded"
    crafted = declaring(rows, cols)
    assert len(crafted) < 1000
    added, outcome = peak_of_loading(crafted, tmp_path)
    assert added <= normal + 16 * 1024, f"refusing took {added / 1024:.0f} MiB, an honest load {normal / 1024:.0f} MiB"
    assert outcome.startswith(f"refused: artifact of {len(crafted):,} bytes declares "), outcome
    assert "more than such an artifact may hold" in outcome and "\n" not in outcome


def test_a_declared_size_the_bytes_may_hold_still_decodes_or_is_refused_by_its_checksum():
    """Within the bound a crafted artifact decodes (an ANS stream can end in a free run of its first symbol) and its
    CRC refuses it; the bound is what keeps it small. pgolf never writes an artifact it would refuse."""
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(declaring(1 << 10, 1 << 10))
    with pytest.raises(ValueError, match="more than such an artifact may hold"):
        compress(serialize(QuantizedModel(CONFIG, {"z": QuantizedTensor(torch.zeros(4096, 8192, dtype=torch.int8),
                                                                         torch.ones(4096).half(), 6, 12.85)})), ANS)


def test_table_beyond_the_codes_bits_is_refused():
    reader = ans._Reader(memoryview(bytes([0, 200]) + bytes(201)))
    table = ans._Table.read(reader, "test")
    spec = ans.ArraySpec("codes", "int8", (1, 1), 0, 6)
    assert table.lo + len(table.values) > 2**spec.bits - 1  # what _decode_codes refuses
    with pytest.raises(ans.StreamError, match="every symbol probability 0"):
        ans._Table.read(ans._Reader(memoryview(bytes([0, 1, 255, 255]))), "test")


def test_step_weights_are_exact_integer_roots():
    weights = ans._step_weights()
    assert weights[0] == 2.0**52 and weights[16] == 2.0**51 and weights[ans.ABSENT] == 0
    assert all(w == int(w) for w in weights) and np.all(np.diff(weights[: ans.ABSENT]) < 0)
    assert abs(weights[8] / 2**52 - 2**-0.5) < 1e-15


def test_histogram_tables_keep_probabilities_within_a_step():
    counts = np.array([0, 5, 100, 1000, 3, 0, 0, 1])
    table = ans._table(counts)
    assert table.lo == 1 and len(table.values) == 7 and table.values[4] == ans.ABSENT
    present = counts[1:] > 0
    weights = table.probabilities()
    ratio = (weights / weights.max())[present] / (counts[1:][present] / 1000)
    assert np.all(np.abs(np.log2(ratio)) <= 0.5 / ans.LOG_STEPS + 1e-12)


def test_large_brotli_sections_round_trip():
    """A brotli section of several MiB decodes piece by piece (the decoder keeps input between calls)."""
    generator = torch.Generator().manual_seed(6)
    data = torch.randint(0, 4, (3 << 20,), generator=generator, dtype=torch.uint8).numpy().tobytes()
    body = brotli.compress(data, quality=1)
    assert ans._decode_bytes(ans.BROTLI, memoryview(body), len(data), 1, "test") == data
    with pytest.raises(ans.StreamError, match="truncated"):
        ans._decode_bytes(ans.BROTLI, memoryview(body)[: len(body) // 2], len(data), 1, "test")
