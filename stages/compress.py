"""DVC stage ``compress``: quantized model -> shuffled, entropy-coded artifact, gated on size.

Reads ``out/quantize/quantized.bin``, compresses it as ``compress:`` says and adds the
code bytes a submission ships: the length of the script the bundle stage wrote
(``pgolf.submit.bundle``). Over ``size_limit_bytes`` the stage
fails, naming size, limit and overshoot, and writes nothing. Otherwise it commits
``out/compress/artifact.ptz``, each tensor's compressed size (plot data) and
``out/compress/metrics.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pgolf.artifact.format import deserialize
from pgolf.artifact.size import pack_artifact, read_code_bytes, tensor_size_rows
from pgolf.atomic import csv_text, stage_outputs
from pgolf.clocks import Clocks
from pgolf.config import CompressConfig, section, to_dict
from pgolf.pipeline import layout
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, run_stage


def run(params: dict, ws: Workspace) -> None:
    cfg = section(params, "compress", CompressConfig)
    ws = ws.begin("compress", params)
    record = log_provenance("compress", {"compress": to_dict(cfg)})
    quantized_path = ws.input(layout.QUANTIZE_MODEL)
    if not quantized_path.is_file():
        raise FileNotFoundError(f"{quantized_path}: not found (run the quantize stage first)")
    code = read_code_bytes(ws.input(layout.BUNDLE_CODE_BYTES))
    raw = quantized_path.read_bytes()
    qm = deserialize(raw)  # validates the input before spending a minute on compression
    clocks = Clocks()
    with clocks.phase("compression"):
        blob = pack_artifact(raw, cfg, code)
    print(f"[pgolf compress] {len(raw):,} raw -> {len(blob):,} bytes ({cfg.compressor}) + {code:,} code", flush=True)
    rows = tensor_size_rows(qm, cfg)
    clocks.record_process("whole_process")
    record["clocks"] = clocks.seconds
    with stage_outputs() as out:
        out.write_bytes(ws.output(layout.COMPRESS_ARTIFACT), blob)
        plots = out.path(ws.output(layout.COMPRESS_PLOTS))
        plots.mkdir()
        (plots / Path(layout.COMPRESS_SIZES).name).write_text(csv_text(rows, layout.COMPRESS_SIZES))
        out.write_json(ws.output(layout.COMPRESS_METRICS), ws.lineage.stamp({
            "artifact_bytes": len(blob), "code_bytes": code, "total_bytes": len(blob) + code,
            "limit": cfg.size_limit_bytes, "headroom": cfg.size_limit_bytes - len(blob) - code,
            "raw_bytes": len(raw),
        }))
        ws.lineage.commit(out, ws.output(layout.COMPRESS_PROVENANCE), record)


def main(argv: list[str] | None = None) -> int:
    return run_stage("compress", run, argv)


if __name__ == "__main__":
    sys.exit(main())
