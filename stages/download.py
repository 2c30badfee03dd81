"""``pgolf download``: the challenge's published shards and tokenizer, into the layout tokenize validates.

Fetches, from the challenge's dataset repository on the Hugging Face hub, every
validation shard, the first ``--train-shards`` train shards and the tokenizer of
``--variant`` (default: ``sp{tokenize.vocab_size}`` of the params file) into
``DEST/datasets/fineweb10B_sp{V}/`` and ``DEST/tokenizers/fineweb_{V}_bpe.model``
(see ``pgolf.data.download``). It prints the disk the missing files need before
fetching anything; run it again after an interruption to fetch only what is
missing. Then point ``tokenize.shards_path`` and ``tokenize.tokenizer_path`` at
what it wrote (``presets/record.yaml`` already does, for ``--dest downloads``).
The frontier's CaseOps data: ``--variant sp8192_lossless_caps_caseops_v1_reserved`` (its
repository, romeerp/parameter-golf-caseops-v1, is then the default): shards, byte sidecar
and tokenizer, then ``tokenize.text_transform: caseops`` as well.
"""

from __future__ import annotations

import json
import sys

from pgolf.config import TokenizeConfig, section
from pgolf.data.download import (
    CASEOPS_REPO_ID,
    CASEOPS_VARIANT,
    DEFAULT_REPO_ID,
    REMOTE_ROOT,
    download_dataset,
    repository_of,
)
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, run_stage, stage_parser


def run(
    params: dict, _workspace: Workspace, variant: str | None, train_shards: int, repo_id: str | None,
    endpoint: str | None, dest: str, remote_root: str,
) -> None:
    # The data is no stage output: it goes to --dest (where the presets' tokenize.shards_path
    # points), in no workspace, so that hand runs and DVC runs read the same download.
    cfg = section(params, "tokenize", TokenizeConfig)
    request = {
        "repo_id": repo_id or repository_of(variant or ""), "variant": variant or f"sp{cfg.vocab_size}",
        "train_shards": train_shards,
        "dest_dir": dest, "endpoint": endpoint, "remote_root": remote_root,
    }
    log_provenance("download", request)
    summary = download_dataset(**request)
    print(f"[pgolf download] done: {json.dumps(summary)}", flush=True)
    wanted = {key: summary[key] for key in ("shards_path", "tokenizer_path", "text_transform")}
    if {key: getattr(cfg, key) for key in wanted} != wanted:
        print("[pgolf download] to use it, set in the params file: "
              + ", ".join(f"tokenize.{key}: {value}" for key, value in wanted.items()), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("download")
    parser.add_argument("--variant", default=None, help="sp1024, sp4096, sp8192 (default: sp{tokenize.vocab_size}) "
                        f"or {CASEOPS_VARIANT}")
    parser.add_argument("--train-shards", type=int, default=128, help="train shards to fetch (default: 128)")
    parser.add_argument("--repo-id", default=None,
                        help=f"hub dataset repository (default: {CASEOPS_REPO_ID} for {CASEOPS_VARIANT}, "
                        f"else {DEFAULT_REPO_ID})")
    parser.add_argument("--endpoint", default=None, help="hub address (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--dest", default="downloads", help="destination folder (default: downloads)")
    parser.add_argument("--remote-root", default=REMOTE_ROOT,
                        help=f"the export's folder in the repository (default: {REMOTE_ROOT})")
    return run_stage("download", run, argv, parser)


if __name__ == "__main__":
    sys.exit(main())
