"""DVC stage ``bundle``: the run's params + pgolf's modules -> the submission's ``train_gpt.py``.

Builds the script a records folder ships (``pgolf.submit.bundle.script_text``): the import
closure of ``compress.code_files`` (the runner ``pgolf/submit/runner.py``) and every section the
runner reads, baked in (``ttt:`` among them: with ``ttt.enabled`` the script scores as the ttt
stage does, and the TTT code is in the closure because the runner imports it). Writes it to
``out/bundle/train_gpt.py`` and its length, the code bytes that quantize's size search and
compress's gate count, to ``out/bundle/code_bytes.json`` alone, so a new script of the same
length re-runs neither.
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
from pgolf.pipeline.stage import Workspace, run_stage
from pgolf.submit.bundle import import_closure, script_text
from pgolf.submit.runner import RunConfigs


def run(params: dict, ws: Workspace) -> None:
    compress = section(params, "compress", CompressConfig)
    configs = RunConfigs(
        model=section(params, "model", ModelConfig), train=section(params, "train", TrainConfig),
        calibrate=section(params, "calibrate", CalibrateConfig), quantize=section(params, "quantize", QuantizeConfig),
        compress=compress, evaluate=section(params, "evaluate", EvaluateConfig), ttt=section(params, "ttt", TTTConfig),
    )
    log_provenance("bundle", {"params": configs.baked()})
    text = script_text(compress.code_files, configs.baked(), compress.compress_code)
    code = len(text.encode("utf-8"))
    with stage_outputs() as out:
        out.write_text(ws.output(layout.BUNDLE_SCRIPT), text)
        out.write_json(ws.output(layout.BUNDLE_CODE_BYTES), {"code_bytes": code})
    print(f"[pgolf bundle] {ws.output(layout.BUNDLE_SCRIPT)}: {code:,} code bytes, "
          f"{len(import_closure(compress.code_files))} modules", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_stage("bundle", run, argv)


if __name__ == "__main__":
    sys.exit(main())
