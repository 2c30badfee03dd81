"""Write ``pgolf/submit/published_records.json``: the per-seed scores of published records, read from the records.

Each record's folder is taken out of a local clone of the challenge repository
(github.com/openai/parameter-golf) at the git ref named below and read by
``pgolf.submit.seeds.read_records_folder``, the reader ``pgolf seeds report --baseline
FOLDER`` uses: the per-seed results of its ``submission.json``, each taken at full precision
from the last score line of that seed's log when the log agrees with the published figure
(the log is the source then), else the published figure itself. Only numbers and the paths
they were read from are written, with the commit of each folder.

Usage::

    python tools/published_records.py --repo /path/to/parameter-golf   # a clone with the refs/pull/* refs
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

from pgolf.submit.seeds import PUBLISHED, read_records_folder

RECORDS = "records/track_10min_16mb"
MAIN = "HEAD"
# key -> (git ref, folder under records/track_10min_16mb/, the per-seed results in submission.json ("": default))
SOURCES = {
    "1394": (MAIN, "2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2", ""),
    "1413": (MAIN, "2026-04-06_SP8192_QK5_LegalTTT_1.0828", ""),
    "1493": (MAIN, "2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT", ""),
    "1514": (MAIN, "2026-04-09_A2_Muon097_3Seed", ""),
    "1530": (MAIN, "2026-04-10_VarLenAttn", ""),
    "1586": ("refs/pull/1586/head", "2026-04-13_AdaptiveClip_Emb7_MLR026", ""),
    "1610": (MAIN, "2026-04-13_VarLenAttn_PhasingTTT2000", ""),
    "1626": (MAIN, "2026-04-14_MultiPhaseGlobalSGD_PhasedTTT", ""),
    "1667": (MAIN, "2026-04-16_SmearGate_AttentionOutputGate_ScoreFirstTTT", ""),
    "1729": (MAIN, "2026-04-18_PR1626_CaseOps_Taper", ""),
    "1736": (MAIN, "2026-04-19_SP8192_CaseOps_GatedAttn_QuantGate_Loop45_PhasedTTT", ""),
    "1769": (MAIN, "2026-04-22_SP8192_CaseOps_GatedAttn_QuantGate_Loop45_PhasedTTT_MLPClip12", ""),
    "1787": (MAIN, "2026-04-23_SP8192_CaseOps_SparseGate_QuantGate_Loop45_PhasedTTT_PolarNS_MinLR_FusedCE", ""),
    "1851": (MAIN, "2026-04-27_SmearGateBOSFix_PR1787Base_LQERAsym_PhasedTTT", ""),
    "1868": (MAIN, "2026-04-29_SmearGateBOSFix_3Seed_1.06141", ""),
    "1868-rerun": (MAIN, "2026-04-29_SmearGateBOSFix_3Seed_1.06141", "compliance_rerun.seed_results"),
    "1855": (MAIN, "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611", ""),
}


def git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True).stdout


def record(repo: Path, ref: str, folder: str, results_key: str, scratch: Path) -> dict:
    commit = git(repo, "rev-parse", ref).decode().strip()
    with tarfile.open(fileobj=io.BytesIO(git(repo, "archive", "--format=tar", commit, f"{RECORDS}/{folder}"))) as tar:
        tar.extractall(scratch, filter="data")
    sample = read_records_folder(scratch / RECORDS / folder, results_key)
    return {"repository": "openai/parameter-golf", "commit": commit, "folder": f"{RECORDS}/{folder}",
            "results": results_key or "default",
            "seeds": {str(s.seed): {"val_bpb": s.val_bpb, "val_loss": s.val_loss, "source": s.source}
                      for s in sample.scores}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a clone of openai/parameter-golf")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        records = {key: record(args.repo, ref, folder, results, Path(scratch) / key)
                   for key, (ref, folder, results) in SOURCES.items()}
    data = {"about": "per-seed val_bpb / val_loss of published records, written by tools/published_records.py",
            "records": records}
    PUBLISHED.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {PUBLISHED}: {len(records)} records")


if __name__ == "__main__":
    main()
