"""Where the pipeline keeps every stage's outputs: declared once, read by the stages and by dvc.yaml.

``dvc.yaml`` loads this file as template variables (``vars: [pgolf/pipeline/layout.py]``: DVC reads
the top-level literals of a Python file) and writes ``${TRAIN_MODEL}`` wherever the stages
write ``layout.TRAIN_MODEL``, so a path cannot drift between the two. Paths are relative to
the pipeline's root; a stage run by hand writes the same tree under its own directory
(``pgolf.pipeline.stage.Workspace``). Only literals belong here, or DVC could not read them.
"""

OUT_DIR = "out"
HAND_RUNS_DIR = "runs"  # where `pgolf STAGE` run by hand writes (never into what DVC tracks)

TOKENIZE_METRICS = "out/tokenize/metrics.json"
TOKENIZE_PROVENANCE = "out/tokenize/provenance.json"

TRAIN_MODEL = "out/train/model.pt"
TRAIN_METRICS = "out/train/metrics.json"
TRAIN_PROVENANCE = "out/train/provenance.json"
TRAIN_PLOTS = "out/train/plots"  # plot data (CSV) of every stage: the plots stage renders it as PNGs
TRAIN_CURVE = "out/train/plots/train.csv"
TRAIN_VAL_CURVE = "out/train/plots/val.csv"  # with train.val_loss_every > 0
TRAIN_CHECKPOINTS = "checkpoints/train"  # resume checkpoints: not a DVC output

PREQUANT_METRICS = "out/prequant/metrics.json"
PREQUANT_PROVENANCE = "out/prequant/provenance.json"

CALIBRATE_HESSIANS = "out/calibrate/hessians.pt"
CALIBRATE_PROVENANCE = "out/calibrate/provenance.json"

QUANTIZE_MODEL = "out/quantize/quantized.bin"
QUANTIZE_REPORT = "out/quantize/report.json"
QUANTIZE_PROVENANCE = "out/quantize/provenance.json"
QUANTIZE_PLOTS = "out/quantize/plots"
QUANTIZE_TENSORS = "out/quantize/plots/tensors.csv"
QUANTIZE_FIT = "out/quantize/plots/fit_search.csv"  # after a quantize.fit_to_size search

BUNDLE_SCRIPT = "out/bundle/train_gpt.py"  # the submission's script: what ships and counts as code
BUNDLE_CODE_BYTES = "out/bundle/code_bytes.json"  # its length alone, so a same-length script re-runs nothing

COMPRESS_ARTIFACT = "out/compress/artifact.ptz"
COMPRESS_METRICS = "out/compress/metrics.json"
COMPRESS_PROVENANCE = "out/compress/provenance.json"
COMPRESS_PLOTS = "out/compress/plots"
COMPRESS_SIZES = "out/compress/plots/tensor_sizes.csv"

EVALUATE_METRICS = "out/evaluate/metrics.json"
EVALUATE_PROVENANCE = "out/evaluate/provenance.json"

TTT_METRICS = "out/ttt/metrics.json"
TTT_PROVENANCE = "out/ttt/provenance.json"
TTT_PLOTS = "out/ttt/plots"
TTT_CHUNKS = "out/ttt/plots/chunks.csv"  # with ttt.enabled

EXPORT_DIR = "out/export"  # the records folder: train_gpt.py, submission.json, README.md, logs

PLOTS_IMAGES = "out/plots/images"  # every stage's plots as PNG (DVC's HTML plots need a CDN; these do not)
PLOTS_PROVENANCE = "out/plots/provenance.json"

TORCHRUN_PARAMS_DIR = ".pgolf"  # resolved params handed to processes relaunched under torchrun
LOCKS_DIR = ".pgolf/locks"  # one lock per stage in each workspace: two runs of a stage never interleave their outputs
