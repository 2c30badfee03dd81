"""N seeds of one configuration: gathering refuses mixed configs by key, discloses every run, reads baselines;
a micro-preset three-seed run of the exported script gives the per-seed table and both tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from pgolf.cli import main as cli
from pgolf.fingerprint import environment
from pgolf.submit.seeds import (
    LEDGER,
    PoolError,
    gather,
    load_baseline,
    published_record,
    read_records_folder,
    seeds_report,
    submission_fields,
)

PARAMS = {"train": {"seed": 0, "matrix_lr": 0.02, "train_log_every": 50}, "quantize": {"matrix_bits": 6}}
# the data part of what a run of the exported script records beside its scores (pgolf.fingerprint)
DATA_FINGERPRINT = {"dataset": "fineweb10B_sp1024", "manifest_sha256": "ab" * 32, "repository_manifest_sha256": None,
                    "docs_sha256": "cd" * 32, "published": None, "val_files_match_published": None, "train_shards": 2,
                    "train_shard_tokens": 400_000, "val_tokens": 4096, "val_bytes": 17_000,
                    "val_files_sha256": {"fineweb_val_000000.bin": "ef" * 32}, "tokenizer": "fineweb_1024_bpe.model",
                    "tokenizer_sha256": "01" * 32, "byte_accounting": "lookup tables"}


def make_run(root: Path, seed: int, bpb: float, params: dict | None = None, script: str = "print('the script')",
             log_bpb: float | None = None) -> Path:
    """A run folder as the exported script leaves it: final_metrics.json, its log, the script."""
    folder = root / f"seed_{seed}"
    folder.mkdir(parents=True)
    params = json.loads(json.dumps(params or PARAMS))
    params["train"]["seed"] = seed
    loss = bpb * 2.5
    metrics = {"seed": seed, "params": params, "quantized": {"val_bpb": bpb + 0.01, "val_loss": loss + 0.025,
                                                             "sliding_val_bpb": bpb, "sliding_val_loss": loss},
               "train": {"steps": 6}, "artifact_bytes": 1000 + seed, "total_bytes": 2000 + seed, "device": "cpu",
               "training_phase_s": 1.0 + seed, "evaluation_phase_s": 0.5, "hardware": "1xcpu",
               "clocks": {"training_loop": 0.5 + seed, "calibration": 0.1 * seed, "training_phase": 1.0 + seed,
                          "evaluation_phase": 0.5},
               "calibration_reserve": {"calibration_s": 0.1 * seed, "gptq_reserve_seconds": 12.0,
                                       "overran": 0.1 * seed > 12.0, "training_data_read_until_s": 0.6 + 1.1 * seed,
                                       "max_wallclock_seconds": 0.0, "past_wallclock": False},
               "fingerprint": {"data": DATA_FINGERPRINT, "environment": environment(torch.device("cpu"), 1, "brotli")}}
    (folder / "final_metrics.json").write_text(json.dumps(metrics))
    (folder / "train_gpt.py").write_text(script)
    (folder / f"train_seed{seed}.log").write_text(
        f"seed:{seed}\nquantized val_loss:{loss + 0.025:.8f} val_bpb:{bpb + 0.01:.8f} eval_time:5ms\n"
        f"quantized_sliding_window val_loss:{loss:.8f} val_bpb:{log_bpb or bpb:.8f} eval_time:9ms\n")
    return folder


def test_runs_of_one_configuration_pool_and_report(tmp_path):
    for seed, bpb in ((42, 1.50), (0, 1.52), (1234, 1.49)):
        make_run(tmp_path, seed, bpb)
    runset = gather([tmp_path])
    assert sorted(run.seed for run in runset.runs) == [0, 42, 1234] and not runset.unfinished
    report = seeds_report(runset, [], "micro")
    assert report["summary"]["bpb"]["mean"] == pytest.approx(np.mean([1.50, 1.52, 1.49]))
    assert report["summary"]["nats"]["std"] == pytest.approx(np.std([3.75, 3.80, 3.725], ddof=1))
    fields = submission_fields(report)
    assert fields["val_bpb"] == round(np.mean([1.50, 1.52, 1.49]), 8) and fields["seeds"] == [0, 42, 1234]  # by seed without a ledger
    assert fields["seed_results"]["42"] == {"val_loss": 3.75, "val_bpb": 1.5, "artifact_bytes": 1042, "steps": 6}


def test_a_mixed_configuration_is_refused_naming_the_key(tmp_path):
    make_run(tmp_path, 42, 1.50)
    make_run(tmp_path, 0, 1.52, params={**PARAMS, "train": {**PARAMS["train"], "matrix_lr": 0.03}})
    with pytest.raises(PoolError, match=r"train\.matrix_lr is 0\.02 in seed_42 but 0\.03 in seed_0; only train\.seed "
                                        r"may differ between the seeds"):
        gather([tmp_path])


def test_a_key_only_one_run_has_is_a_difference(tmp_path):
    make_run(tmp_path, 42, 1.50)
    make_run(tmp_path, 0, 1.52, params={**PARAMS, "ttt": {"enabled": True}})
    with pytest.raises(PoolError, match=r"ttt\.enabled is '\(absent\)' in seed_42 but True in seed_0"):
        gather([tmp_path])


def test_run_settings_may_differ_but_not_the_code(tmp_path):
    make_run(tmp_path / "a", 42, 1.50)
    make_run(tmp_path / "a", 0, 1.52, params={**PARAMS, "train": {**PARAMS["train"], "train_log_every": 1}})
    assert len(gather([tmp_path / "a"]).runs) == 2  # train.train_log_every changes the log, not the outputs
    make_run(tmp_path / "b", 42, 1.50)
    make_run(tmp_path / "b", 0, 1.52, script="print('other code')")
    with pytest.raises(PoolError, match="their train_gpt.py differ"):
        gather([tmp_path / "b"])


def test_a_seed_pooled_twice_is_refused(tmp_path):
    make_run(tmp_path / "day1", 42, 1.50)
    make_run(tmp_path / "day2", 42, 1.51)
    with pytest.raises(PoolError, match="seed 42 twice"):
        gather([tmp_path / "day1", tmp_path / "day2"])


def test_every_run_started_is_disclosed(tmp_path):
    make_run(tmp_path, 42, 1.50)
    make_run(tmp_path, 0, 1.52)
    (tmp_path / "seed_7").mkdir()
    (tmp_path / "seed_7" / "train_seed7.log").write_text("step:1/6 train_loss:6.9\nRuntimeError: CUDA out of memory\n")
    ledger = [{"seed": s, "folder": f"seed_{s}"} for s in (42, 0, 7)]
    (tmp_path / LEDGER).write_text("".join(json.dumps(entry) + "\n" for entry in ledger))
    report = seeds_report(gather([tmp_path]), [], "micro")
    assert report["unfinished"] == [{"folder": "seed_7", "seed": 7, "reason": "no final_metrics.json; its log ends: "
                                                                              "RuntimeError: CUDA out of memory"}]
    assert report["summary"]["n"] == 2
    (tmp_path / LEDGER).write_text((tmp_path / LEDGER).read_text() + json.dumps({"seed": 9, "folder": "seed_9"}) + "\n")
    with pytest.raises(ValueError, match=r"run\(s\) seed_9 were started but their folders are gone"):
        gather([tmp_path])


def test_metrics_that_disagree_with_the_log_are_refused(tmp_path):
    make_run(tmp_path, 42, 1.50, log_bpb=1.40)
    with pytest.raises(ValueError, match="scores val_bpb 1.50000000.*its log train_seed42.log ends with val_bpb "
                                         "1.40000000"):
        gather([tmp_path])



@pytest.mark.parametrize("spoil, expected", [
    (lambda metrics: "", "empty (a JSON object expected)"),
    (lambda metrics: json.dumps(metrics)[:-40], "not JSON (Expecting"),
    (lambda metrics: json.dumps({k: v for k, v in metrics.items() if k not in ("seed", "quantized")}),
     "no seed: not the final_metrics.json of a finished run"),
    (lambda metrics: json.dumps(metrics | {"quantized": {}}), "no quantized.val_loss, quantized.val_bpb"),
])
def test_a_malformed_or_incomplete_run_is_named_with_its_missing_keys(tmp_path, spoil, expected):
    """No JSON traceback and no KeyError: one error naming the run's final_metrics.json and what it lacks."""
    path = make_run(tmp_path, 42, 1.50) / "final_metrics.json"
    path.write_text(spoil(json.loads(path.read_text())))
    with pytest.raises(ValueError) as raised:
        gather([tmp_path])
    assert str(raised.value).startswith(f"{path}: {expected}"), raised.value


def test_the_records_evidence_names_a_run_without_the_times_it_needs(tmp_path):
    from pgolf.submit.export import seed_evidence

    path = make_run(tmp_path, 42, 1.50) / "final_metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["clocks"]["evaluation_phase"], metrics["calibration_reserve"]
    path.write_text(json.dumps(metrics))
    reserve = ", ".join(f"calibration_reserve.{key}"
                        for key in ("calibration_s", "overran", "training_data_read_until_s"))
    with pytest.raises(ValueError, match=f"{path}: no clocks.evaluation_phase, {reserve}: "):
        seed_evidence(tmp_path, "print('the script')", [], "micro")

def test_a_records_folder_gives_each_seed_at_its_logs_precision(tmp_path):
    submission = {"name": "a record", "seed_results": {"42": {"val_bpb": 1.08664, "val_loss": 2.80691},
                                                       "0": {"val_bpb": 1.08000}}}
    (tmp_path / "submission.json").write_text(json.dumps(submission))
    (tmp_path / "train_seed42.log").write_text("quantized_sliding_window val_loss:2.80691494 val_bpb:1.08664424\n")
    (tmp_path / "train_seed420.log").write_text("quantized_sliding_window val_loss:2.9 val_bpb:1.08664001\n")
    (tmp_path / "train_seed0.log").write_text("quantized_sliding_window val_loss:2.9 val_bpb:1.07\n")  # disagrees
    record = read_records_folder(tmp_path)
    assert [(s.seed, s.val_bpb, s.val_loss, s.source) for s in record.scores] == [
        (42, 1.08664424, 2.80691494, "train_seed42.log"), (0, 1.08, None, "submission.json")]
    assert load_baseline(str(tmp_path)).label == "a record"


def test_the_carried_records_are_the_published_seeds():
    """#1855 (F11), #1868's reruns (F14) and #1787 (F34) per seed as their logs give them (pgolf/submit/published_records.json)."""
    def seeds(name):
        return {s.seed: (s.val_bpb, s.val_loss) for s in published_record(name).scores}

    assert seeds("#1855") == {42: (1.05989454, 2.31944212), 0: (1.06124613, 2.32239991), 1234: (1.06208695, 2.32423994)}
    assert {k: v[0] for k, v in seeds("#1868-rerun").items()} == {42: 1.06083288, 314: 1.06090748, 1234: 1.06248776}
    assert {k: round(v[0], 5) for k, v in seeds("#1787").items()} == {42: 1.06400, 0: 1.06308, 1234: 1.06297}
    assert round(float(np.mean([v[0] for v in seeds("#1394").values()])), 5) == 1.08562  # 1.08563 from rounded seeds
    assert len(seeds("#1586")) == 3 and published_record("#1586").source.startswith("openai/parameter-golf@208d40e98a87")
    with pytest.raises(ValueError, match="#9999: not a published record pgolf carries"):
        published_record("#9999")


def test_the_command_reports_one_line_errors_and_lists_the_published_records(tmp_path, capsys):
    make_run(tmp_path, 42, 1.50)
    make_run(tmp_path, 0, 1.52, params={**PARAMS, "quantize": {"matrix_bits": 5}})
    assert cli(["seeds", "report", str(tmp_path)]) == 2
    assert "pgolf seeds: error: cannot pool" in capsys.readouterr().err
    assert cli(["seeds", "run", "--script", "nope.py", "--seeds", "1,x", "--data", ".", "--runs", "r"]) == 2
    assert "--seeds '1,x': expected comma-separated integers" in capsys.readouterr().err
    assert cli(["seeds", "published"]) == 0
    listed = capsys.readouterr().out
    assert "#1855          3 seeds, mean val_bpb 1.06107587" in listed and "#1586" in listed and "#1394" in listed


def test_the_runner_takes_its_seed_from_the_environment():
    from pgolf.submit.runner import seeded

    params = {"train": {"seed": 1337, "iterations": 6}, "model": {}}
    assert seeded(params, None) is params
    assert seeded(params, "42") == {"train": {"seed": 42, "iterations": 6}, "model": {}}
    with pytest.raises(ValueError, match="SEED='forty-two': not a seed"):
        seeded(params, "forty-two")


# ---------------------------------------------------------------- the exported script, three seeds (micro preset)


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory) -> Path:
    """The micro preset's dataset in the challenge's layout: the tokenize stage on the embedded corpus."""
    import yaml

    root = tmp_path_factory.mktemp("data")
    params = micro_params()
    params["tokenize"]["data_dir"] = str(root / "data")
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    subprocess.run([sys.executable, "-m", "stages.tokenize", "--params", str(params_file), "--out", str(root / "out")],
                   check=True, env=env, capture_output=True, timeout=600)
    return root / "data"


def micro_params() -> dict:
    import yaml

    return yaml.safe_load(Path("presets/micro.yaml").read_text())


def exported_script(folder: Path, **changes: dict) -> Path:
    """The micro preset's train_gpt.py, as the bundle stage writes it, with section changes."""
    from pgolf.submit.bundle import script_text
    from pgolf.submit.sections import RunConfigs

    params = micro_params()
    for name, values in changes.items():
        params[name] |= values
    baked = RunConfigs.from_baked({name: params[name] for name in RunConfigs.section_names()}).baked()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_gpt.py").write_text(script_text(params["compress"]["code_files"], baked))
    return folder / "train_gpt.py"


@pytest.mark.slow
def test_three_seeds_of_the_micro_preset_give_the_table_and_both_tests(micro_data, tmp_path, capsys):
    runs, other = tmp_path / "runs", tmp_path / "baseline_runs"
    assert cli(["seeds", "run", "--script", str(exported_script(tmp_path / "a")), "--seeds", "42,0,1234",
                "--data", str(micro_data), "--runs", str(runs)]) == 0
    retuned = exported_script(tmp_path / "b", quantize={"matrix_clip_sigmas": 30.0})
    assert cli(["seeds", "run", "--script", str(retuned), "--seeds", "1,2", "--data", str(micro_data),
                "--runs", str(other)]) == 0
    capsys.readouterr()
    assert cli(["seeds", "report", str(runs), "--baseline", str(other), "--baseline", "#1394",
                "--label", "micro"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((runs / "seeds.json").read_text())
    assert (runs / "seeds.md").read_text() == printed

    rows = {row["seed"]: row for row in report["runs"]}
    assert sorted(rows) == [0, 42, 1234] and len({row["val_bpb"] for row in rows.values()}) == 3  # the seed matters
    for seed, row in rows.items():
        final = json.loads((runs / f"seed_{seed}" / "final_metrics.json").read_text())
        assert final["seed"] == seed and row["val_bpb"] == final["quantized"]["sliding_val_bpb"]
        log = (runs / f"seed_{seed}" / f"train_seed{seed}.log").read_text()
        assert f"seed:{seed}\n" in log and f"val_bpb:{row['val_bpb']:.8f}" in log
        assert f"| {seed} | {row['val_bpb']:.8f} | {row['val_loss']:.8f} |" in printed
    bpb, nats = [r["val_bpb"] for r in report["runs"]], [r["val_loss"] for r in report["runs"]]
    assert report["summary"]["bpb"] == {"mean": pytest.approx(np.mean(bpb)), "std": pytest.approx(np.std(bpb, ddof=1))}
    assert report["summary"]["nats"] == {"mean": pytest.approx(np.mean(nats)),
                                         "std": pytest.approx(np.std(nats, ddof=1))}
    against_runs, against_record = report["baselines"]
    base = [r["val_bpb"] for r in against_runs["seeds"]]
    assert against_runs["progression"]["p"] == stats.ttest_ind(bpb, base, equal_var=False, alternative="less").pvalue
    assert against_runs["readme_rule"]["p"] == pytest.approx(stats.ttest_ind(
        np.array(bpb) + 0.005 * np.mean(np.array(bpb) / np.array(nats)), base, equal_var=False,
        alternative="less").pvalue)
    published = [s.val_bpb for s in published_record("#1394").scores]
    assert against_record["label"] == "#1394" and against_record["progression"]["p"] == stats.ttest_ind(
        bpb, published, equal_var=False, alternative="less").pvalue
    assert "## Against #1394" in printed and "| Progression: Welch p < 0.25 |" in printed

    # the two configurations are not seeds of one: refused, naming the key
    with pytest.raises(PoolError, match=r"quantize\.matrix_clip_sigmas is 30\.0 in seed_1 but 12\.85 in seed_42"):
        gather([runs, other])


@pytest.mark.slow
def test_the_exported_script_refuses_leaked_data_naming_the_document(micro_data, tmp_path):
    from pgolf.data.shards import dataset_path, read_shard, shard_files, split_documents, write_shard

    data = tmp_path / "data"
    shutil.copytree(micro_data, data)
    dataset = dataset_path(data, 1024)
    val = split_documents(np.asarray(read_shard(shard_files(dataset, "val")[0])), 1, "val")
    last = shard_files(dataset, "train")[-1]
    write_shard(last, np.concatenate([read_shard(last), [1], val[3]]))  # validation document 3, appended
    folder = exported_script(tmp_path / "run").parent
    (folder / "data").symlink_to(data)
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_STAGE", "PYTHONPATH")}
    result = subprocess.run([sys.executable, "train_gpt.py"], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "validation document 3 (fineweb_val_000000.bin at token" in result.stderr
    assert f"{val[3].size:,} tokens" in result.stderr and f"is also in {last.name}" in result.stderr
    assert not (folder / "final_model.pt").exists()  # refused before training


def test_the_records_folder_carries_every_seed_and_the_tests(tmp_path):
    from pgolf.config import ExportConfig
    from pgolf.submit.export import RunRecord, seed_evidence, write_records_folder

    script = exported_script(tmp_path / "export").read_text()
    runs = tmp_path / "runs"
    for seed, bpb in ((42, 1.50), (0, 1.52), (1234, 1.49)):
        make_run(runs, seed, bpb, script=script)
    (runs / "seed_7").mkdir()
    (runs / "seed_7" / "train_seed7.log").write_text("killed\n")
    report, times, logs = seed_evidence(runs, script, ["#1394"], "micro")
    assert times["training_phase_s"] == 1.0 + 1234 and times["hardware"] == "1xcpu"  # the slowest run's
    code = len(script.encode())
    record = RunRecord(script=script, compress={"code_bytes": code, "artifact_bytes": 1000, "limit": 16_000_000},
                       evaluate={"quantized": {"val_bpb": 1.6, "val_loss": 4.0}}, prequant={}, train={"steps": 6},
                       measured=times, seeds=report)
    dest = tmp_path / "records" / "2026-12-01_micro"
    info = write_records_folder(dest, record, ExportConfig(name="micro", date="2026-12-01"), logs)

    assert info["val_bpb"] == round(np.mean([1.50, 1.52, 1.49]), 8) and info["seeds"] == [0, 42, 1234]
    assert info["seed_results"]["1234"]["val_bpb"] == 1.49 and info["val_bpb_std"] > 0
    assert info["unfinished_runs"][0]["folder"] == "seed_7" and info["statistics"]["#1394"]["progression_p"] > 0.99
    readme = (dest / "README.md").read_text()
    assert "| 1234 | 1.49000000 | 3.72500000 | 6 |" in readme and "### Against #1394" in readme and "seed_7" in readme
    rules = json.loads((dest / "compliance.json").read_text())["rules"]
    assert rules["every_seed_disclosed"]["value"] == 4 and rules["significance_vs_sota"]["status"] == "fail"
    assert "1235.0 s on 1xcpu" in rules["train_under_600s"]["how"]
    assert json.loads((dest / "seeds.json").read_text()) == report
    assert {p.relative_to(dest / "logs").as_posix() for p in (dest / "logs").rglob("*") if p.is_file()} == {
        "seed_42/train_seed42.log", "seed_42/final_metrics.json", "seed_0/train_seed0.log",
        "seed_0/final_metrics.json", "seed_1234/train_seed1234.log", "seed_1234/final_metrics.json",
        "seed_7/train_seed7.log"}
    assert load_baseline(str(dest)).bpb().tolist() == [1.52, 1.50, 1.49]  # the folder is a baseline in turn

    make_run(tmp_path / "other", 5, 1.5, script="print('not the exported script')")
    with pytest.raises(ValueError, match="is not the exported one"):
        seed_evidence(tmp_path / "other", script, [], "micro")
