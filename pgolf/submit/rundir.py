"""What a run of the exported script is told and what it leaves behind, shared by the runner and ``pgolf seeds``.

The runner (shipped inside ``train_gpt.py``) reads its seed from ``SEED`` in the environment,
as the challenge's records are run (``SEED=42 torchrun ... train_gpt.py``), and writes its
metrics to ``final_metrics.json`` in the folder it runs in; ``pgolf.submit.seeds`` starts
runs that way and reads them back. Kept apart so that gathering runs imports none of the
runner's training code.
"""

METRICS_FILE = "final_metrics.json"
SEED_ENV = "SEED"  # sets train.seed of the baked params
