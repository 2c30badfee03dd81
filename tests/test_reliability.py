"""Bad input and faults on the micro pipeline: exit code 2, one line naming the key/file/value, no traceback,
and the previous outputs byte-identical afterwards.

The micro pipeline (presets/micro.yaml) is built once; every test works on a copy of it and runs a stage
through ``pgolf.cli.main`` as a user would.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf import cli
from pgolf.config import TrainConfig
from pgolf.data.shards import read_shard, write_shard
from pgolf.distributed import init_distributed
from pgolf.model.gpt import GPT
from pgolf.pipeline import layout
from pgolf.train.loop import Trainer, TrainingDiverged, train
from tests.model.test_files import CONFIG, flip_bit_in_tensor_data
from tests.train.recorded_batches import RecordedBatches

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every stage of dvc.yaml, in order, as `pgolf` arguments; `--out .` writes the pipeline's own tree.
STAGES = [["tokenize"], ["train"], ["prequant"], ["calibrate"], ["bundle"], ["quantize"],
          ["compress"], ["evaluate"]]
DATASET = Path("data/datasets/fineweb10B_sp1024")
TOKENIZER = Path("data/tokenizers/fineweb_1024_bpe.model")

def run_micro_stages(root: Path, stages: list[list[str]], changes: dict[str, str] | None = None) -> Path:
    """The micro preset (its text with each of ``changes`` replaced) run stage by stage in ``root``."""
    text = (REPO_ROOT / "presets" / "micro.yaml").read_text()
    for old, new in (changes or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    (root / "params.yaml").write_text(text)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for stage in stages:
            assert cli.main([*stage, "--out", "."]) == 0, stage
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """The micro pipeline, run once: every stage's outputs in a working directory."""
    return run_micro_stages(tmp_path_factory.mktemp("micro"), STAGES)


@pytest.fixture(autouse=True)
def no_record_sized_run(monkeypatch):
    """A check that fails to stop a record-sized run must fail the test, not exhaust the machine's memory."""
    real_run = Trainer.run

    def guarded(self, *args, **kwargs):
        if self.cfg.train_batch_tokens > 65_536:
            raise RuntimeError(f"a record-sized training run started ({self.cfg.train_batch_tokens} tokens a step)")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run", guarded)


@pytest.fixture
def work(pipeline, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "work"
    shutil.copytree(pipeline, root)
    monkeypatch.chdir(root)
    return root


def outputs(root: Path) -> dict[str, bytes]:
    """Every file the stages wrote (data/ and out/), hidden ones included, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes()
            for top in ("data", "out") for p in sorted((root / top).rglob("*")) if p.is_file()}


def fails_cleanly(root: Path, capsys, argv: list[str], *expected: str) -> str:
    """Run ``pgolf ARGV``: exit 2, one error line holding every ``expected`` text, no traceback, outputs as before."""
    before = outputs(root)
    capsys.readouterr()
    assert cli.main([*argv, "--out", "."]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # progress bars redraw with \r
    errors = [line for line in lines if line.startswith("pgolf ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    for text in expected:
        assert text in errors[0], errors[0]
    after = outputs(root)
    assert after.keys() == before.keys(), sorted(after.keys() ^ before.keys())
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"changed by a failed run: {changed}"
    return errors[0]


# ---------------------------------------------------------------- configuration: one line, before any work


@pytest.mark.parametrize("stage, key, value, allowed", [
    ("train", "train.iterations", "0", "must be >= 1"),
    ("train", "train.train_seq_len", "0", "must be >= 1"),
    ("train", "train.grad_accum_steps", "0", "must be >= 1"),
    ("train", "model.model_dim", "-32", "must be >= 1"),
    ("evaluate", "evaluate.eval_seq_len", "0", "must be >= 1"),
    ("evaluate", "evaluate.eval_batch_seqs", "0", "must be >= 1"),
    ("evaluate", "evaluate.eval_stride", "0", "must be >= 1"),
    ("compress", "compress.brotli_quality", "99", "must be in [0, 11]"),
    ("compress", "compress.lzma_preset", "42", "must be in [0, 9]"),
])
def test_a_bad_value_is_one_line_naming_file_key_value_and_range(work, capsys, stage, key, value, allowed):
    line = fails_cleanly(work, capsys, [stage, "--set", f"{key}={value}"],
                         f"params.yaml: {key}: {value} is out of range: {allowed}")
    assert line.startswith(f"pgolf {stage}: error: ")


def test_a_params_file_that_is_not_utf8_is_named(work, capsys):
    (work / "bad.yaml").write_bytes(b"train:\n  seed: 1 # \xff\n")
    fails_cleanly(work, capsys, ["train", "--params", "bad.yaml"], "bad.yaml: not UTF-8 text (byte 19: invalid start byte)")


def test_a_missing_section_is_named_not_taken_for_the_record(work, capsys):
    (work / "partial.yaml").write_text("tokenize: {vocab_size: 1024}\nmodel: {vocab_size: 1024}\n")
    fails_cleanly(work, capsys, ["train", "--params", "partial.yaml"], "partial.yaml: missing section(s) train")


# ---------------------------------------------------------------- data checked against the manifest


def test_a_missing_train_shard_is_named(work, capsys):
    (work / DATASET / "fineweb_train_000001.bin").unlink()
    fails_cleanly(work, capsys, ["train"], "fineweb_train_000001.bin: listed in manifest.json but missing")


@pytest.mark.parametrize("stage, shard", [("train", "fineweb_train_000000.bin"),
                                          ("calibrate", "fineweb_train_000000.bin"),
                                          ("evaluate", "fineweb_val_000000.bin")])
def test_a_token_id_beyond_the_vocabulary_is_named(work, capsys, stage, shard):
    tokens = read_shard(work / DATASET / shard).copy()
    tokens[7] = 1030
    write_shard(work / DATASET / shard, tokens)
    fails_cleanly(work, capsys, [stage], f"{shard}: token id 1030 at position 7 is not below vocab_size 1024")


def test_a_different_tokenizer_of_the_same_size_is_named(work, capsys):
    shutil.copy(work / TOKENIZER, work / "spare.model")
    data = bytearray((work / TOKENIZER).read_bytes())
    data[-3] ^= 1  # another tokenizer file: the manifest's sha256 no longer matches
    (work / TOKENIZER).write_bytes(bytes(data))
    fails_cleanly(work, capsys, ["train"], f"{TOKENIZER}: sha256 ", "not that of the tokenizer")
    # a stage whose inputs were made with the tokenizer as it was says so first (pgolf.pipeline.lineage)
    fails_cleanly(work, capsys, ["evaluate"], f"{TOKENIZER} is not from the run", f"{TOKENIZER}: ",
                  f"in {layout.COMPRESS_PROVENANCE}")


# ---------------------------------------------------------------- model files: checksum and finite weights


@pytest.mark.parametrize("stage", [["calibrate"], ["prequant"]], ids=["calibrate", "prequant"])
def test_a_flipped_bit_in_the_model_file_is_named(work, capsys, stage):
    flip_bit_in_tensor_data(work / "out" / "train" / "model.pt")
    fails_cleanly(work, capsys, stage, "out/train/model.pt: model file is corrupt")


def test_prequant_evaluation_refuses_non_finite_weights(work, capsys):
    from pgolf.model.files import FORMAT, VERSION, save_tagged

    payload = torch.load(work / "out" / "train" / "model.pt", weights_only=True)
    payload["state_dict"]["tok_emb.weight"][0, 0] = float("nan")
    save_tagged(work / "out" / "train" / "model.pt", FORMAT, VERSION,
                {"model_config": payload["model_config"], "state_dict": payload["state_dict"]})
    fails_cleanly(work, capsys, ["prequant"],
                  "out/train/model.pt: non-finite weights (NaN or inf) in tok_emb.weight")


def test_a_diverging_training_run_stops_naming_the_step(work, capsys, monkeypatch):
    real_forward = GPT.forward
    calls = [0]

    def diverging(self, inputs, targets):
        calls[0] += 1
        loss = real_forward(self, inputs, targets)
        return loss * float("inf") if calls[0] > 6 else loss  # from step 4 (two micro-batches a step)

    monkeypatch.setattr(GPT, "forward", diverging)
    fails_cleanly(work, capsys, ["train"], "the training loss is inf at step 4 of 6: the run diverged")


def test_the_divergence_check_names_the_first_bad_step_between_log_steps(monkeypatch):
    """The loss turns NaN at step 3 and is noticed at the step-5 log, before anything is written."""
    cfg = TrainConfig(iterations=8, max_wallclock_seconds=0, warmup_steps=0, train_batch_tokens=64,
                      train_seq_len=16, grad_accum_steps=1, train_log_every=5, device="cpu", compile=False)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 64, (4, 16), generator=generator), torch.randint(0, 64, (4, 16), generator=generator))
               for _ in range(8)]
    real_forward = GPT.forward
    calls = [0]

    def forward(self, inputs, targets):
        calls[0] += 1
        loss = real_forward(self, inputs, targets)
        return loss + float("nan") if calls[0] == 3 else loss

    monkeypatch.setattr(GPT, "forward", forward)
    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged, match=r"^train: the training loss is nan at step 3 of 8: the run diverged"):
        train(GPT(CONFIG), cfg, RecordedBatches(batches, 1), init_distributed("cpu"), progress=False)
    assert calls[0] == 5  # stopped at the first check, the log of step 5


# ---------------------------------------------------------------- operating-system failures and stage transactions


def fail_replace_of(monkeypatch, name: str, err: int) -> None:
    """``os.replace``/``os.rename`` onto a destination called ``name`` raise ``OSError(err)``."""
    for function in ("replace", "rename"):
        real = getattr(os, function)

        def failing(source, destination, *args, _real=real, **kwargs):
            if Path(destination).name == name:
                raise OSError(err, os.strerror(err))
            return _real(source, destination, *args, **kwargs)

        monkeypatch.setattr(os, function, failing)


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC])
def test_a_failed_commit_of_the_first_output_is_one_line_naming_path_and_operation(work, capsys, monkeypatch, err):
    fail_replace_of(monkeypatch, "model.pt", err)
    fails_cleanly(work, capsys, ["train"], f"cannot rename the new version into out/train/model.pt: {os.strerror(err)}")


def test_a_failed_commit_of_the_metrics_leaves_the_previous_model_too(work, capsys, monkeypatch):
    fail_replace_of(monkeypatch, "metrics.json", errno.EROFS)
    fails_cleanly(work, capsys, ["train"], "out/train/metrics.json")


def test_compress_that_cannot_write_its_artifact_keeps_the_previous_metrics(work, capsys, monkeypatch):
    fail_replace_of(monkeypatch, "artifact.ptz", errno.ENOSPC)
    fails_cleanly(work, capsys, ["compress", "--set", "compress.brotli_quality=5"], "out/compress/artifact.ptz")


def test_the_checks_refuse_only_what_is_wrong(work):
    """The untouched pipeline passes every check: the stages run again on the same data, to the same scores."""
    before = json.loads((work / "out" / "evaluate" / "metrics.json").read_text())
    assert cli.main(["train", "--out", "."]) == 0 and cli.main(["evaluate", "--out", "."]) == 0
    after = json.loads((work / "out" / "evaluate" / "metrics.json").read_text())
    assert np.isfinite(after["quantized"]["val_bpb"]) and after["quantized"] == before["quantized"]


def test_evaluate_refuses_an_artifact_with_non_finite_weights(work, capsys):
    from pgolf.artifact.compress import compress
    from pgolf.artifact.format import serialize
    from pgolf.artifact.load import load_artifact
    from pgolf.config import CompressConfig

    path = work / "out" / "compress" / "artifact.ptz"
    qm = load_artifact(path.read_bytes())
    name = next(n for n, t in qm.tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point())
    qm.tensors[name].view(-1)[0] = float("inf")  # a passthrough tensor of the artifact
    path.write_bytes(compress(serialize(qm), CompressConfig(brotli_quality=1)))
    fails_cleanly(work, capsys, ["evaluate"], f"out/compress/artifact.ptz: non-finite weights (NaN or inf) in {name}")


# ---------------------------------------------------------------- a non-finite score is no result


def test_prequant_refuses_a_model_whose_finite_weights_give_a_non_finite_loss(work, capsys):
    """Weights 1e30 times too large are finite, and the loss they give is NaN: an error, nothing written."""
    from pgolf.model.files import FORMAT, VERSION, save_tagged

    payload = torch.load(work / "out" / "train" / "model.pt", weights_only=True)
    payload["state_dict"]["blocks.0.mlp.fc.weight"] *= 1e30
    assert torch.isfinite(payload["state_dict"]["blocks.0.mlp.fc.weight"]).all()
    save_tagged(work / "out" / "train" / "model.pt", FORMAT, VERSION,
                {"model_config": payload["model_config"], "state_dict": payload["state_dict"]})
    fails_cleanly(work, capsys, ["prequant"], "out/train/model.pt: unquantized plain evaluation: the loss summed over",
                  "is nan: the model's predictions are not finite")


def test_evaluate_refuses_predictions_that_are_not_finite(work, capsys, monkeypatch):
    real = GPT.forward_logits
    monkeypatch.setattr(GPT, "forward_logits", lambda self, *args: real(self, *args) * float("nan"))
    fails_cleanly(work, capsys, ["evaluate"], "out/compress/artifact.ptz: quantized plain evaluation: the loss summed",
                  "is nan: the model's predictions are not finite (NaN or inf)")



# micro's validation split cut short, in chunks and document groups small enough that every method trains
# before it scores again, and phased pauses once for a phase that takes steps
SMALL_TTT = ["ttt.enabled=true", "ttt.max_val_tokens=2049", "ttt.chunk_tokens=512", "ttt.lora_batch_docs=4",
             "ttt.phase_prefix_docs=4", "ttt.phase_count=1", "ttt.phase_chunk_tokens=256"]


@pytest.mark.parametrize("method, diverging, where", [
    ("sgd_all", "ttt.lr", "chunk 1 of 4"), ("adamw_tail", "ttt.lr", "chunk 1 of 4"),
    ("lora_doc", "ttt.lora_lr", "document group 0 of 5"), ("phased", "ttt.phase_lr", "document group 2 of 5")])
def test_ttt_with_a_diverging_learning_rate_commits_nothing_naming_method_and_chunk(work, capsys, method, diverging,
                                                                                    where):
    """Every method, its learning rate too large: one line naming the method, the chunk and the key; no metrics."""
    settings = [*SMALL_TTT, f"ttt.method={method}", f"{diverging}=1e30"]
    fails_cleanly(work, capsys, ["ttt", *(item for setting in settings for item in ("--set", setting))],
                  f"pgolf ttt: error: ttt {method}: {where} scored a summed loss of nan: test-time training diverged",
                  f"({diverging}=1e+30)", "there is no score")
    assert not (work / layout.TTT_METRICS).exists()

# ---------------------------------------------------------------- disk full: one line naming the file, nothing half-written

FILE_SIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from pgolf import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def fails_on_a_full_disk(root: Path, limit: int, argv: list[str], *expected: str) -> str:
    """Run ``pgolf ARGV`` in a process that may write no file beyond ``limit`` bytes (the disk is full for it):
    exit 2, one error line holding every ``expected`` text, no traceback, data/ and out/ as before."""
    before = outputs(root)
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED, str(limit), *argv, "--out", "."], cwd=root,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in re.split(r"[\r\n]", done.stderr) if line.strip()]
    errors = [line for line in lines if line.startswith("pgolf ")]
    assert len(errors) == 1 and errors[0] == lines[-1], done.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    assert outputs(root) == before, "a failed write changed or left files"
    return errors[0]


def test_a_full_disk_while_train_saves_the_model_is_one_line_naming_it(work):
    size = (work / "out" / "train" / "model.pt").stat().st_size
    fails_on_a_full_disk(work, size // 2, ["train"], "pgolf train: error: cannot write out/train/model.pt: File too large")


def test_a_full_disk_while_import_saves_the_model_is_one_line_naming_it(work):
    payload = torch.load(work / "out" / "train" / "model.pt", weights_only=True)
    torch.save(payload["state_dict"], work / "final_model.pt")  # a final_model.pt of the record's script
    size = (work / "out" / "train" / "model.pt").stat().st_size
    fails_on_a_full_disk(work, size // 2, ["import", str(work / "final_model.pt")],
                         "pgolf import: error: cannot write out/train/model.pt: File too large")


def test_a_full_disk_while_export_writes_the_folder_is_one_line_naming_it(work):
    assert cli.main(["export", "--out", "."]) == 0
    script = (work / "out" / "export" / "train_gpt.py").stat().st_size
    fails_on_a_full_disk(work, script // 2, ["export"], "pgolf export: error: cannot write out/export",
                         "File too large")



# ---------------------------------------------------------------- someone else's files


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def another_submission(folder: Path) -> dict[str, bytes]:
    """A records folder that pgolf did not write: its script, README and logs."""
    (folder / "logs").mkdir(parents=True)
    (folder / "train_gpt.py").write_text("print('their record')\n")
    (folder / "README.md").write_text("# their record\n")
    (folder / "logs" / "train_seed42.log").write_text("step 1/20000\n")
    return tree(folder)


def test_export_refuses_to_replace_a_folder_it_did_not_write(work, capsys):
    dest = work.parent / "records" / "2026-01-01_theirs"
    theirs = another_submission(dest)
    fails_cleanly(work, capsys, ["export", "--dest", str(dest)],
                  f"pgolf export: error: {dest}: holds README.md, logs/train_seed42.log, train_gpt.py (no "
                  ".pgolf-export.json: not a folder pgolf export wrote); refusing to replace it")
    assert tree(dest) == theirs
    (work / "notes.txt").write_text("mine\n")
    fails_cleanly(work, capsys, ["export", "--dest", str(work / "notes.txt")], "notes.txt: not a folder")
    assert (work / "notes.txt").read_text() == "mine\n"


def test_export_replaces_its_own_folder_but_nothing_added_or_changed_in_it(work, capsys):
    dest = work.parent / "records" / "2026-12-01_micro"
    assert cli.main(["export", "--out", ".", "--dest", str(dest)]) == 0
    listed = json.loads((dest / ".pgolf-export.json").read_text())["files"]
    assert set(listed) == set(tree(dest)) - {".pgolf-export.json"} and "logs/train_provenance.json" in listed
    assert cli.main(["export", "--out", ".", "--dest", str(dest)]) == 0  # what it wrote, it may replace
    (dest / "notes.md").write_text("my notes\n")
    (dest / "README.md").write_text((dest / "README.md").read_text() + "\nedited by hand\n")
    kept = tree(dest)
    fails_cleanly(work, capsys, ["export", "--dest", str(dest)],
                  f"{dest}: holds README.md, notes.md (added or changed since pgolf export wrote the folder)")
    assert tree(dest) == kept


def this_submissions_run(root: Path) -> dict:
    """final_metrics.json of a run of the micro pipeline's script that made its artifact, on the declared GPUs."""
    from pgolf.data.shards import file_sha256
    from tests.submit.test_compliance import H100, measured_run

    script = (root / layout.BUNDLE_SCRIPT).read_bytes()
    return measured_run(H100) | {
        "code_sha256": file_sha256(root / layout.BUNDLE_SCRIPT), "code_bytes": len(script),
        "artifact_sha256": file_sha256(root / layout.COMPRESS_ARTIFACT),
        "artifact_bytes": json.loads((root / layout.COMPRESS_METRICS).read_text())["artifact_bytes"]}


def test_export_measured_takes_the_times_of_a_run_of_this_submission(work):
    run_dir = work.parent / "measured"
    run_dir.mkdir()
    (run_dir / "final_metrics.json").write_text(json.dumps(this_submissions_run(work)))
    assert cli.main(["export", "--out", ".", "--measured", str(run_dir)]) == 0
    rule = json.loads((work / "out" / "export" / "compliance.json").read_text())["rules"]["train_under_600s"]
    assert (rule["status"], rule["value"]) == ("pass", 590.0)


@pytest.mark.parametrize("key", ["code_sha256", "code_bytes", "artifact_sha256", "artifact_bytes"])
def test_export_measured_refuses_another_runs_metrics_naming_what_differs(work, capsys, key):
    run_dir = work.parent / "measured"
    run_dir.mkdir()
    metrics = this_submissions_run(work)
    ours = metrics[key]
    metrics[key] = "0" * 64 if key.endswith("sha256") else ours + 1
    (run_dir / "final_metrics.json").write_text(json.dumps(metrics))
    fails_cleanly(work, capsys, ["export", "--measured", str(run_dir)],
                  f"pgolf export: error: {run_dir / 'final_metrics.json'} is another run's: {key} {metrics[key]} "
                  f"(this submission's: {ours}); --measured takes a run of this submission's train_gpt.py")


@pytest.mark.parametrize("text, expected", [
    ("", "final_metrics.json: empty"),
    ('{"clocks": {', "final_metrics.json: not JSON (Expecting"),
    ("[]", "final_metrics.json: a JSON list, not an object"),
    ("{}", "final_metrics.json: no code_sha256, code_bytes, artifact_sha256, artifact_bytes, hardware, "
           "clocks.training_phase, clocks.evaluation_phase, calibration_reserve.calibration_s"),
    (None, "final_metrics.json: no clocks.training_phase, clocks.evaluation_phase: not the final_metrics.json of a "
           "finished run"),
])
def test_export_measured_names_a_malformed_file_and_its_missing_keys(work, capsys, text, expected):
    run_dir = work.parent / "measured"
    run_dir.mkdir()
    if text is None:  # this submission's run, its clocks taken out
        text = json.dumps({key: value for key, value in this_submissions_run(work).items() if key != "clocks"})
    (run_dir / "final_metrics.json").write_text(text)
    fails_cleanly(work, capsys, ["export", "--measured", str(run_dir)], f"{run_dir}/{expected}")

# ---------------------------------------------------------------- a stage's outputs are one commit

# Every stage that commits several outputs, with a change that gives every output new bytes, and its outputs.
MULTI_OUTPUT_STAGES = {
    "tokenize": (["tokenize.tokenizer_train_docs=2900"],
                 [str(DATASET), str(TOKENIZER), layout.TOKENIZE_PROVENANCE, layout.TOKENIZE_METRICS]),
    "train": (["train.seed=7"], [layout.TRAIN_MODEL, layout.TRAIN_PLOTS, layout.TRAIN_PROVENANCE, layout.TRAIN_METRICS]),
    "prequant": (["evaluate.max_val_tokens=2048"], [layout.PREQUANT_PROVENANCE, layout.PREQUANT_METRICS]),
    "calibrate": (["calibrate.seed=7"], [layout.CALIBRATE_HESSIANS, layout.CALIBRATE_PROVENANCE]),
    "bundle": (["compress.compress_code=false"], [layout.BUNDLE_SCRIPT, layout.BUNDLE_CODE_BYTES]),
    "quantize": (["quantize.matrix_clip_sigmas=10.0"],
                 [layout.QUANTIZE_MODEL, layout.QUANTIZE_PLOTS, layout.QUANTIZE_PROVENANCE, layout.QUANTIZE_REPORT]),
    "compress": (["compress.brotli_quality=5"],
                 [layout.COMPRESS_ARTIFACT, layout.COMPRESS_PLOTS, layout.COMPRESS_PROVENANCE, layout.COMPRESS_METRICS]),
    "evaluate": (["evaluate.max_val_tokens=2048"], [layout.EVALUATE_PROVENANCE, layout.EVALUATE_METRICS]),
    "ttt": (["ttt.method=adamw_tail"], [layout.TTT_PLOTS, layout.TTT_PROVENANCE, layout.TTT_METRICS]),  # first outputs
    "plots": ([], [layout.PLOTS_IMAGES, layout.PLOTS_PROVENANCE]),  # first outputs: the micro run has no plots stage
}
# a kill right after each call of these; unlink removes the commit journal, the commit point itself
KILL_POINTS = ("rename", "replace", "link", "unlink")

# One process imports the stages once and forks a child per run; a child may be killed right after the N-th call
# of one of KILL_POINTS. Jobs come as JSON lines on stdin, each answered with one JSON line.
FORK_SERVER = """
import json, os, signal, sys
os.environ["DVC_STAGE"] = "fault-injection"
from pgolf import cli
from pgolf.cli import STAGE_MODULES
import importlib
for module in STAGE_MODULES.values():
    importlib.import_module(f"stages.{module}")
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    child = os.fork()
    if child == 0:
        os.chdir(job["dir"])
        calls = {}
        def after(name, real):
            def wrapped(*args, **kwargs):
                result = real(*args, **kwargs)
                calls[name] = calls.get(name, 0) + 1
                if job["kill"] == [name, calls[name]]:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result
            return wrapped
        for name in job["points"]:
            setattr(os, name, after(name, getattr(os, name)))
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = cli.main(job["argv"])
        sys.stdout.flush()
        sys.stderr.flush()
        with open(job["log"] + ".calls", "w") as handle:
            json.dump({"code": code, "calls": calls}, handle)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    print(json.dumps({"killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL}), flush=True)
"""


class ForkServer:
    """Stage runs in forked children of one process that imported the stages (and torch) once."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.process = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                                        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
        assert json.loads(self.process.stdout.readline())["ready"]
        self.count = 0

    def run(self, root: Path, argv: list[str], kill: tuple[str, int] | None = None) -> tuple[bool, dict]:
        """Run ``pgolf ARGV --out .`` in ``root``: (killed, {"code": exit code, "calls": {name: count}})."""
        self.count += 1
        log = self.logs / f"run-{self.count}.log"
        job = {"dir": str(root), "argv": [*argv, "--out", "."], "kill": list(kill) if kill else None,
               "points": list(KILL_POINTS), "log": str(log)}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        killed = json.loads(self.process.stdout.readline())["killed"]
        done = Path(f"{log}.calls")
        result = json.loads(done.read_text()) if done.is_file() else {}
        assert killed or result.get("code") == 0, log.read_text()[-3000:]
        return killed, result

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


# Wall-clock figures differ in every run of the same inputs, and so do the hashes of the files that hold them
# (a record's lineage.outputs): sets are compared without them.
WALL_CLOCK = {"clocks", "seconds", "train_time_s", "tokens_per_s", "elapsed_s"}


def without_wall_clock(value, parent: str = ""):
    if isinstance(value, dict):
        return {key: without_wall_clock(item, key) for key, item in value.items()
                if key not in WALL_CLOCK and not (parent == "lineage" and key == "outputs")}
    return [without_wall_clock(item) for item in value] if isinstance(value, list) else value


def content(path: Path) -> bytes:
    """A file's bytes, or for JSON and CSV its content without the wall-clock figures."""
    data = path.read_bytes()
    if path.suffix == ".json":
        return json.dumps(without_wall_clock(json.loads(data)), sort_keys=True).encode()
    if path.suffix == ".csv":
        rows = [line.split(",") for line in data.decode().splitlines()]
        kept = [column for column, name in enumerate(rows[0] if rows else []) if name not in WALL_CLOCK]
        return "\n".join(",".join(row[column] for column in kept) for row in rows).encode()
    return data


def output_files(root: Path, paths: list[str]) -> dict[str, bytes | None]:
    """Each output's files with their content (a directory's files under it), hidden temporaries aside."""
    found: dict[str, bytes | None] = {}
    for name in paths:
        path = root / name
        if path.is_dir():
            found |= {str(p.relative_to(root)): content(p) for p in sorted(path.rglob("*")) if p.is_file()}
            found[name] = None  # the directory itself, even when empty
        elif path.is_file():
            found[name] = content(path)
    return found


def leftovers(root: Path, paths: list[str]) -> list[str]:
    """Temporaries, old copies and commit journals beside the outputs or above them."""
    places = {(root / name).parent for name in paths} | {root, root / "out", root / "data"}
    return sorted(str(p.relative_to(root)) for place in places if place.is_dir() for p in place.iterdir()
                  if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name
                                                 or p.name.startswith(".pgolf-commit-")))


def restore(root: Path, pristine: Path, paths: list[str]) -> None:
    """Put the outputs back as the pipeline left them, removing whatever a run left beside them."""
    for name in leftovers(root, paths):
        shutil.rmtree(root / name) if (root / name).is_dir() else (root / name).unlink()
    for name in paths:
        path, source = root / name, pristine / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        if source.is_dir():
            shutil.copytree(source, path)
        elif source.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, path)


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(MULTI_OUTPUT_STAGES))
def test_a_kill_after_any_rename_of_a_stages_commit_leaves_the_old_or_the_new_set(pipeline, tmp_path, stage):
    """SIGKILL right after each rename, replace and link of a real stage run: once recovered (as the next reader or
    writer of any of its outputs does), the outputs are the old complete set or the new one, nothing is left beside
    them, and a re-run completes."""
    from pgolf.atomic import recover

    overrides, paths = MULTI_OUTPUT_STAGES[stage]
    argv = [stage, *(item for key in overrides for item in ("--set", key))]
    root = tmp_path / "work"
    shutil.copytree(pipeline, root)
    if stage == "plots":  # other curves than the pipeline's: new images
        curve = root / layout.TRAIN_CURVE
        header, first, *rest = curve.read_text().splitlines(keepends=True)
        curve.write_text("".join([header, first.replace(",", ",1", 1), *rest]))
    old = output_files(root, paths)
    (tmp_path / "logs").mkdir()
    server = ForkServer(tmp_path / "logs")
    try:
        _, reference = server.run(root, argv)
        new = output_files(root, paths)
        assert set(new) >= set(paths) and all(new[name] != old.get(name) for name in paths if new[name] is not None)
        points = [(name, index) for name in KILL_POINTS for index in range(1, reference["calls"].get(name, 0) + 1)]
        assert len(points) >= len(paths)
        outcomes = []
        for point in points:
            restore(root, pipeline, paths)
            assert output_files(root, paths) == old
            killed, _ = server.run(root, argv, kill=point)
            assert killed, f"os.{point[0]} call {point[1]} was not reached"
            recover(root / paths[-1])  # the next reader of one output (Workspace.input) recovers the whole set
            found = output_files(root, paths)
            assert found in (old, new), f"killed after os.{point[0]} call {point[1]}: a mix {sorted(found)}"
            outcomes.append("new" if found == new else "old")
            for name in paths:
                recover(root / name)
            assert not leftovers(root, paths), f"killed after os.{point[0]} call {point[1]}"
            server.run(root, argv)  # the re-run completes
            assert output_files(root, paths) == new, f"the re-run after os.{point[0]} call {point[1]}"
    finally:
        server.close()
    assert "old" in outcomes and "new" in outcomes, outcomes  # kills before, inside and after the commit
