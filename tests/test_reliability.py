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
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf import cli
from pgolf.config import TrainConfig
from pgolf.data.shards import read_shard, write_shard
from pgolf.distributed import init_distributed
from pgolf.model.gpt import GPT
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
    fails_cleanly(work, capsys, ["evaluate"], f"{TOKENIZER}: sha256 ", "not that of the tokenizer")


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
