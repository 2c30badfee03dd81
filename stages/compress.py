"""DVC stage ``compress``: quantized model -> shuffled, brotli-coded artifact, gated on size.

Reads ``out/quantize/quantized.bin``, compresses it as ``compress:`` in ``params.yaml`` says
and adds the bytes of the code files a submission must ship. Over ``size_limit_bytes`` the
stage fails, naming size, limit and overshoot, and writes no artifact. Otherwise it writes
``out/compress/artifact.ptz``, ``out/compress/metrics.json`` and each tensor's compressed
size (alone) as a CSV and a bar plot.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pgolf.atomic import write_bytes, write_json
from pgolf.cli import run_stage
from pgolf.codec import (
    QuantizedModel,
    QuantizedTensor,
    code_bytes,
    compress,
    compressed_tensor_sizes,
    decompress,
    deserialize,
)
from pgolf.config import CompressConfig, section, to_dict
from pgolf.plots import bar_plot, write_csv
from pgolf.provenance import log_provenance

QUANTIZED_PATH = Path("out/quantize/quantized.bin")
ARTIFACT_PATH = Path("out/compress/artifact.ptz")
METRICS_PATH = Path("out/compress/metrics.json")
SIZES_CSV_PATH = Path("out/compress/plots/tensor_sizes.csv")
SIZES_PNG_PATH = Path("out/compress/plots/tensor_sizes.png")


def check_size(artifact_bytes: int, code: int, limit: int) -> None:
    """The challenge's gate: compressed artifact + code bytes at most ``limit``."""
    total = artifact_bytes + code
    if total > limit:
        raise ValueError(
            f"submission too large: {artifact_bytes:,} artifact + {code:,} code = {total:,} bytes, "
            f"over the limit of {limit:,} by {total - limit:,} bytes (raise quantize clip sigmas or lower bits)"
        )


def run(params: dict) -> None:
    cfg = section(params, "compress", CompressConfig)
    log_provenance("compress", to_dict(cfg))
    if not QUANTIZED_PATH.is_file():
        raise FileNotFoundError(f"{QUANTIZED_PATH}: not found (run the quantize stage first)")
    code = code_bytes(cfg.code_files, cfg.compress_code)
    raw = QUANTIZED_PATH.read_bytes()
    qm = deserialize(raw)  # validates the input before spending a minute on brotli
    blob = compress(raw, cfg)
    if decompress(blob) != raw:
        raise ValueError(f"{cfg.compressor} round trip changed the data: artifact not written")
    print(f"[pgolf compress] {len(raw):,} raw -> {len(blob):,} bytes ({cfg.compressor}) + {code:,} code", flush=True)
    check_size(len(blob), code, cfg.size_limit_bytes)
    write_tensor_sizes(compressed_tensor_sizes(qm, cfg), qm)
    write_json(METRICS_PATH, {
        "artifact_bytes": len(blob),
        "code_bytes": code,
        "total_bytes": len(blob) + code,
        "limit": cfg.size_limit_bytes,
        "headroom": cfg.size_limit_bytes - len(blob) - code,
        "raw_bytes": len(raw),
    })
    write_bytes(ARTIFACT_PATH, blob)


def write_tensor_sizes(sizes: dict[str, int], qm: QuantizedModel) -> None:
    """The per-tensor attribution table (CSV for ``dvc plots``) and its bar plot."""
    rows = []
    for name, compressed in sizes.items():
        tensor = qm.tensors[name]
        quantized = isinstance(tensor, QuantizedTensor)
        numel = tensor.q.numel() if quantized else tensor.numel()
        rows.append({
            "tensor": name,
            "kind": "quantized" if quantized else "passthrough",
            "bits": tensor.bits if quantized else 8 * tensor.element_size(),
            "numel": numel,
            "compressed_bytes": compressed,
            "bits_per_weight": round(8 * compressed / max(numel, 1), 4),
        })
    write_csv(SIZES_CSV_PATH, rows)
    bar_plot(SIZES_PNG_PATH, [row["tensor"] for row in rows], [row["compressed_bytes"] for row in rows],
             "tensor", "bytes (compressed alone)", "Compressed size per tensor")


def main(argv: list[str] | None = None) -> int:
    return run_stage("compress", run, argv)


if __name__ == "__main__":
    sys.exit(main())
