"""What a run of the exported script is told and what it leaves behind, shared by the runner and ``pgolf seeds``.

The runner (shipped inside ``train_gpt.py``) reads its seed from ``SEED`` in the environment,
as the challenge's records are run (``SEED=42 torchrun ... train_gpt.py``), and writes its
metrics to ``final_metrics.json`` in the folder it runs in; ``pgolf.submit.seeds`` starts
runs that way and reads them back; both take the submission's score of an artifact evaluated
without TTT from :func:`artifact_score`. Kept apart so that gathering runs imports none of the
runner's training code.
"""

from __future__ import annotations

METRICS_FILE = "final_metrics.json"
SEED_ENV = "SEED"  # sets train.seed of the baked params


def artifact_score(quantized: dict[str, float]) -> tuple[str, dict[str, float]]:
    """The artifact's evaluation as a score: ``("sliding", {val_loss, val_bpb})`` when scored so, else the plain one."""
    kind = "sliding" if "sliding_val_bpb" in quantized else "plain"
    prefix = "sliding_" if kind == "sliding" else ""
    return kind, {"val_loss": quantized[f"{prefix}val_loss"], "val_bpb": quantized[f"{prefix}val_bpb"]}
