"""DVC stage ``bundle``: the run's params + pgolf's modules -> the submission's ``train_gpt.py``.

Builds the script a records folder ships (``pgolf.submit.bundle.script_text``): what the runner
``pgolf/submit/runner.py`` (``compress.code_files``) runs, shaken and minified, and every section
the runner reads, baked in (``ttt:`` among them: with ``ttt.enabled`` the script scores as the
ttt stage does and ships the TTT code; without, it ships none; with ``compress.bake_params: changed``
only the values that differ from the defaults). Writes it to
``out/bundle/train_gpt.py`` and its length, the code bytes that quantize's size search and
compress's gate count, to ``out/bundle/code_bytes.json`` alone, so a new script of the same
length re-runs neither. It trains nothing: ``python -m stages.bundle --params FILE --out DIR``
gives any params file's code bytes in seconds, and ``--modules`` prints what each module weighs.
"""

from __future__ import annotations

import sys

from pgolf.atomic import stage_outputs
from pgolf.config import (
    CalibrateConfig,
    CompressConfig,
    EvaluateConfig,
    ModelConfig,
    QuantizeConfig,
    TrainConfig,
    TTTConfig,
    section,
)
from pgolf.pipeline import layout
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, run_stage, stage_parser
from pgolf.submit.bundle import module_sizes, read_bundle, script_text
from pgolf.submit.sections import RunConfigs, script_params


def run(params: dict, ws: Workspace, modules: bool = False) -> None:
    compress = section(params, "compress", CompressConfig)
    configs = RunConfigs(  # section by section, as every stage names what it reads (pgolf.pipeline.deps)
        model=section(params, "model", ModelConfig), train=section(params, "train", TrainConfig),
        calibrate=section(params, "calibrate", CalibrateConfig), quantize=section(params, "quantize", QuantizeConfig),
        compress=compress, evaluate=section(params, "evaluate", EvaluateConfig), ttt=section(params, "ttt", TTTConfig),
    )
    log_provenance("bundle", {"params": configs.baked()})
    text = script_text(compress.code_files, script_params(configs), compress.script_compressor)
    code = len(text.encode("utf-8"))
    with stage_outputs() as out:
        out.write_text(ws.output(layout.BUNDLE_SCRIPT), text)
        out.write_json(ws.output(layout.BUNDLE_CODE_BYTES), {"code_bytes": code})
    files = read_bundle(text)["files"]
    print(f"[pgolf bundle] {ws.output(layout.BUNDLE_SCRIPT)}: {code:,} code bytes, {len(files)} modules", flush=True)
    if modules:
        print(module_table(module_sizes(files), code), flush=True)


def module_table(rows: list[dict], code: int) -> str:
    """One line per shipped module: bytes as written and as shipped, brotli alone, and its share of the code bytes
    (its part of the modules' compressed bytes, applied to the script's)."""
    total = sum(row["compressed"] for row in rows) or 1
    lines = [f"{'module':<32} {'written':>8} {'shipped':>8} {'brotli':>7} {'share':>7}"]
    lines += [f"{row['path']:<32} {row['written']:>8,} {row['shipped']:>8,} {row['compressed']:>7,} "
              f"{code * row['compressed'] / total:>7,.0f}" for row in rows if row["shipped"]]
    written = sum(row["written"] for row in rows)
    shipped = sum(row["shipped"] for row in rows)
    lines.append(f"{f'all {len(rows)} modules':<32} {written:>8,} {shipped:>8,} {total:>7,} {code:>7,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("bundle")
    parser.add_argument("--modules", action="store_true", help="print what each shipped module weighs")
    return run_stage("bundle", run, argv, parser)


if __name__ == "__main__":
    sys.exit(main())
