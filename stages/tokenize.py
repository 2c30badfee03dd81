"""DVC stage ``tokenize``: documents -> SentencePiece tokenizer -> challenge-format shards.

Reads the ``tokenize:`` section. With ``shards_path`` set it validates
already-tokenized shards and their tokenizer and links them into place;
otherwise it trains a tokenizer (or reuses ``tokenizer_path``) and streams the
documents file (or the embedded corpus) through it. Outputs, committed together
once everything succeeded: ``{data_dir}/datasets/fineweb10B_sp{V}/`` (shards +
``manifest.json``), ``{data_dir}/tokenizers/fineweb_{V}_bpe.model`` and the
stage's metrics and provenance.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pgolf.atomic import stage_outputs
from pgolf.config import TokenizeConfig, section, to_dict
from pgolf.data.dataset import build_dataset
from pgolf.data.shards import MANIFEST_NAME, SPLITS, dataset_path
from pgolf.data.tokenizer import tokenizer_file
from pgolf.pipeline import layout
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, run_stage


def run(params: dict, ws: Workspace) -> None:
    cfg = section(params, "tokenize", TokenizeConfig)
    ws = ws.begin("tokenize", params)
    record = log_provenance("tokenize", {"tokenize": to_dict(cfg)})
    dataset_dir = ws.output(dataset_path(cfg.data_dir, cfg.vocab_size))
    model_path = ws.output(tokenizer_file(cfg.data_dir, cfg.vocab_size))
    with stage_outputs() as out:
        model_tmp, dataset_tmp = out.path(model_path), out.path(dataset_dir)
        dataset_tmp.mkdir()
        manifest = build_dataset(cfg, model_tmp, dataset_tmp)
        manifest["tokenizer"]["path"] = str(tokenizer_file(cfg.data_dir, cfg.vocab_size))
        (dataset_tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        out.write_json(ws.output(layout.TOKENIZE_METRICS), ws.lineage.stamp(metrics(manifest)))
        ws.lineage.commit(out, ws.output(layout.TOKENIZE_PROVENANCE), record)
    print(f"[pgolf tokenize] wrote {dataset_dir} and {model_path}: " + json.dumps(manifest["splits"]), flush=True)


def metrics(manifest: dict[str, Any]) -> dict[str, int]:
    figures = {f"{split}_{key}": manifest["splits"][split][key] for split in SPLITS for key in ("documents", "tokens")}
    figures.update({f"{split}_files": len(manifest["splits"][split]["files"]) for split in SPLITS})
    check = manifest["byte_check"]  # the bytes scores divide by, and what the rule was checked against
    counts = ("table_bytes", "decoded_bytes", "text_bytes", "uncovered_bytes")
    return {**figures, "val_bytes": check["val_bytes"], **{f"val_{key}": check[key] for key in counts if key in check}}


def main(argv: list[str] | None = None) -> int:
    return run_stage("tokenize", run, argv)


if __name__ == "__main__":
    sys.exit(main())
