"""Outputs are replaced whole: fault injection at every step, recovery, and SIGKILL mid-replacement."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pgolf.atomic import OutputError, atomic_open, atomic_path, recover, stage_outputs, write_bytes, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) with its bytes; None for a directory."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def write_previous(root: Path) -> None:
    """A previous stage run's outputs: a model file, a directory of plots and metrics."""
    (root / "out" / "plots").mkdir(parents=True)
    (root / "out" / "model.pt").write_bytes(b"old model")
    (root / "out" / "plots" / "a.csv").write_text("old a\n")
    (root / "out" / "plots" / "b.csv").write_text("old b\n")
    (root / "out" / "metrics.json").write_text('{"old": true}\n')


def run_stage(root: Path, fail_inside: bool = False) -> None:
    """A stage's transaction: model, plot directory, metrics last."""
    with stage_outputs() as out:
        out.write_bytes(root / "out" / "model.pt", b"new model")
        plots = out.path(root / "out" / "plots")
        plots.mkdir()
        (plots / "c.csv").write_text("new c\n")
        if fail_inside:
            raise RuntimeError("computation failed")
        out.write_json(root / "out" / "metrics.json", {"new": True})


def test_a_stage_replaces_files_and_directories_and_leaves_nothing_beside_them(tmp_path):
    write_previous(tmp_path)
    run_stage(tmp_path)
    assert snapshot(tmp_path) == {
        "out": None, "out/metrics.json": b'{\n  "new": true\n}\n', "out/model.pt": b"new model",
        "out/plots": None, "out/plots/c.csv": b"new c\n",
    }


def test_a_failure_inside_the_stage_replaces_nothing_and_removes_every_temporary(tmp_path):
    write_previous(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="computation failed"):
        run_stage(tmp_path, fail_inside=True)
    assert snapshot(tmp_path) == before


def test_first_outputs_appear_where_nothing_was(tmp_path):
    run_stage(tmp_path)
    assert (tmp_path / "out" / "model.pt").read_bytes() == b"new model"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "model.pt", "plots"]


def count_calls(monkeypatch, names: list[str]) -> dict[str, int]:
    """How often the commit of ``run_stage`` calls each of ``os.<names>`` (to inject at each call)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(os, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, counted)
    return calls


def fail_at(monkeypatch, name: str, index: int, err: int = errno.EIO) -> None:
    """Make the ``index``-th call of ``os.<name>`` raise ``OSError(err)``."""
    real = getattr(os, name)
    seen = [0]

    def failing(*args, **kwargs):
        seen[0] += 1
        if seen[0] == index:
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, failing)


FAULT_POINTS = ["rename", "replace", "link", "fsync"]


@pytest.mark.parametrize("operation", FAULT_POINTS)
def test_a_failure_at_any_step_of_the_commit_leaves_the_previous_outputs_byte_identical(tmp_path, operation):
    """Every call of ``os.rename``/``replace``/``link``/``fsync`` in turn fails with EIO."""
    reference = tmp_path / "count"
    write_previous(reference)
    with pytest.MonkeyPatch.context() as patch:
        calls = count_calls(patch, [operation])
        run_stage(reference)
    assert calls[operation] > 0, f"the commit never calls os.{operation}"
    for index in range(1, calls[operation] + 1):
        root = tmp_path / f"{operation}-{index}"
        write_previous(root)
        before = snapshot(root)
        with pytest.MonkeyPatch.context() as patch:
            fail_at(patch, operation, index)
            try:
                run_stage(root)
            except OutputError as exc:
                message = str(exc)
                assert "\n" not in message and str(root / "out") in message and "cannot " in message
                assert snapshot(root) == before, f"os.{operation} call {index} failing changed the outputs"
                continue
        # A failure after the commit point (deleting the old copy) may not undo it: the new set is whole.
        assert (root / "out" / "model.pt").read_bytes() == b"new model"
        assert (root / "out" / "metrics.json").read_bytes() == b'{\n  "new": true\n}\n'
        assert sorted(p.name for p in (root / "out").iterdir()) == ["metrics.json", "model.pt", "plots"]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failed_write_names_the_output_and_keeps_the_previous_one(tmp_path, monkeypatch, err):
    write_previous(tmp_path)
    before = snapshot(tmp_path)
    real_write_bytes = Path.write_bytes

    def full_disk(self, data):
        if self.name.startswith(".model.pt.tmp-"):
            raise OSError(err, os.strerror(err))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OutputError, match=rf"cannot write {tmp_path / 'out' / 'model.pt'}: {os.strerror(err)}$"):
        run_stage(tmp_path)
    assert snapshot(tmp_path) == before


def test_a_parent_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "out").write_text("a file where a directory should be")
    with pytest.raises(OutputError, match=rf"cannot create the directory of {tmp_path / 'out' / 'model.pt'}"):
        write_bytes(tmp_path / "out" / "model.pt", b"x")
    assert isinstance(OutputError(), OSError) and isinstance(OutputError(), ValueError)


def test_the_convenience_writers_replace_whole(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": 2})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    with atomic_open(tmp_path / "t.txt", "w", encoding="utf-8") as handle:
        handle.write("text")
    with pytest.raises(ValueError), atomic_open(tmp_path / "t.txt", "w", encoding="utf-8") as handle:
        handle.write("half")
        raise ValueError("stop")
    assert (tmp_path / "t.txt").read_text() == "text"
    with atomic_path(tmp_path / "d") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "m.json", "t.txt"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_number_is_never_committed_to_json(tmp_path, bad):
    write_json(tmp_path / "metrics.json", {"old": True})
    with pytest.raises(ValueError, match=rf"metrics.json: quantized\.scores\.1 is {bad}: refusing to commit a "
                                         r"non-finite number \(NaN or inf\)$"):
        write_json(tmp_path / "metrics.json", {"quantized": {"scores": [1.0, bad]}, "val_bpb": 1.1})
    assert snapshot(tmp_path) == {"metrics.json": b'{\n  "old": true\n}\n'}


def test_registering_an_output_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="registered twice"), stage_outputs() as out:
        out.path(tmp_path / "x")
        out.path(tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_was_never_written_fails_the_commit_and_keeps_the_rest(tmp_path):
    write_previous(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="nothing was written"), stage_outputs() as out:
        out.write_bytes(tmp_path / "out" / "model.pt", b"new")
        out.path(tmp_path / "out" / "metrics.json")
    assert snapshot(tmp_path) == before


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_recover_restores_a_stranded_old_directory_when_the_new_one_never_arrived(tmp_path):
    old = tmp_path / f".dataset.old-{dead_pid()}"
    old.mkdir()
    (old / "shard.bin").write_bytes(b"old")
    recover(tmp_path / "dataset")
    assert snapshot(tmp_path) == {"dataset": None, "dataset/shard.bin": b"old"}


def test_recover_restores_an_old_directory_even_under_a_reused_pid(tmp_path):
    old = tmp_path / f".dataset.old-{os.getppid()}"  # a live process: the PID was reused after a restart
    old.mkdir()
    recover(tmp_path / "dataset")
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]


def test_recover_deletes_the_old_copy_and_dead_temporaries_once_the_new_one_is_in(tmp_path):
    pid = dead_pid()
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "shard.bin").write_bytes(b"new")
    for tag in ("old", "tmp"):
        (tmp_path / f".dataset.{tag}-{pid}").mkdir()
        (tmp_path / f".dataset.{tag}-{pid}" / "shard.bin").write_bytes(b"partial")
    live = tmp_path / f".dataset.tmp-{os.getppid()}"  # a live process's work in progress stays
    live.mkdir()
    recover(tmp_path / "dataset")
    assert snapshot(tmp_path) == {"dataset": None, "dataset/shard.bin": b"new", live.name: None}


# ---------------------------------------------------------------- SIGKILL

KILLER = textwrap.dedent(
    """
    import json, os, shutil, signal, sys
    target, index = sys.argv[1], int(sys.argv[2])  # index 0: count the calls only
    seen = {}
    def kill_at(name, real):
        def wrapped(*args, **kwargs):
            seen[name] = seen.get(name, 0) + 1
            if name == target and seen[name] == index:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return wrapped
    for name in ("rename", "replace", "fsync", "unlink", "link"):
        setattr(os, name, kill_at(name, getattr(os, name)))
    shutil.rmtree = kill_at("rmtree", shutil.rmtree)
    """
)
COUNTS = "\nprint('calls', json.dumps(seen))\n"

REPLACE_DIRECTORY = KILLER + textwrap.dedent(
    """
    from pathlib import Path
    from pgolf.atomic import atomic_path
    with atomic_path(Path(sys.argv[3])) as tmp:
        tmp.mkdir()
        for i in range(4):
            (tmp / f"shard_{i}.bin").write_bytes(b"new" * 1000)
    """
)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def call_counts(script: str, args: list[str], cwd: Path) -> dict[str, int]:
    """How often an unkilled run of ``script`` calls each patched operation."""
    done = subprocess.run([sys.executable, "-c", script + COUNTS, "none", "0", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.split("calls ")[-1])


def killed_run(script: str, operation: str, index: int, args: list[str], cwd: Path) -> None:
    child = subprocess.run([sys.executable, "-c", script, operation, str(index), *args], cwd=cwd, env=child_env(),
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, f"os.{operation} call {index} was not reached: {child.stderr[-2000:]}"


def test_sigkill_at_every_step_of_a_directory_replacement_leaves_a_complete_directory(tmp_path):
    old = {f"shard_{i}.bin": b"old" * 500 for i in range(3)}
    new = {f"shard_{i}.bin": b"new" * 1000 for i in range(4)}

    def prepare(root: Path) -> Path:
        (root / "dataset").mkdir(parents=True)
        for name, data in old.items():
            (root / "dataset" / name).write_bytes(data)
        return root / "dataset"

    counts = call_counts(REPLACE_DIRECTORY, [str(prepare(tmp_path / "count"))], tmp_path)
    assert counts["rename"] == 2 and counts["fsync"] >= 5 and counts["rmtree"] >= 1  # old aside, new in
    points = [(operation, index) for operation, calls in counts.items() for index in range(1, calls + 1)]
    outcomes = set()
    for operation, index in points:
        dataset = prepare(tmp_path / f"{operation}-{index}")
        killed_run(REPLACE_DIRECTORY, operation, index, [str(dataset)], tmp_path)
        outcomes.add("stranded" if not dataset.exists() else "in place")
        recover(dataset)
        found = {p.name: p.read_bytes() for p in dataset.iterdir()}
        assert found in (old, new), f"SIGKILL at os.{operation} call {index}: {sorted(found)}"
        assert [p.name for p in dataset.parent.iterdir()] == ["dataset"], f"leftovers after os.{operation} {index}"
        outcomes.add("new" if found == new else "old")
    assert outcomes == {"old", "new", "stranded", "in place"}


TOKENIZE = KILLER + textwrap.dedent(
    """
    from stages.tokenize import main
    code = main(["--params", sys.argv[3], "--out", "."])  # by hand, into the pipeline's own tree
    assert code == 0, code
    """
)


def tokenize_params(path: Path, shared: Path, num_val_docs: int, shard_size: int) -> Path:
    path.write_text(json.dumps({"tokenize": {
        "docs_path": str(shared / "fineweb" / "docs_sample.jsonl"),
        "tokenizer_path": str(shared / "tokenizers" / "fineweb_8192_bpe.model"),
        "vocab_size": 8192, "num_val_docs": num_val_docs, "shard_size": shard_size, "num_workers": 1}}))
    return path


@pytest.mark.slow
def test_sigkill_of_the_tokenize_stage_replacing_a_dataset_always_leaves_a_complete_one(tmp_path, shared_dir):
    """Kill ``stages.tokenize`` at each rename, in the deletion of the old dataset and in its fsyncs."""
    from pgolf.data.shards import check_dataset, dataset_path
    from pgolf.data.tokenizer import tokenizer_file

    old_params = tokenize_params(tmp_path / "old.yaml", shared_dir, num_val_docs=50, shard_size=40_000)
    new_params = tokenize_params(tmp_path / "new.yaml", shared_dir, num_val_docs=60, shard_size=30_000)
    built = {}
    for name, params in (("old", old_params), ("new", new_params)):
        done = subprocess.run([sys.executable, "-m", "stages.tokenize", "--params", str(params), "--out", "."],
                              cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        built[name] = snapshot(tmp_path / "data" / "datasets")
        shutil.move(tmp_path / "data", tmp_path / f"data-{name}")
    assert built["old"] and built["new"] and built["old"] != built["new"]

    def prepare(root: Path) -> Path:
        shutil.copytree(tmp_path / "data-old", root / "data")
        return root

    counts = call_counts(TOKENIZE, [str(new_params)], prepare(tmp_path / "count"))
    points = [("rename", i) for i in range(1, counts["rename"] + 1)]
    points += [("replace", i) for i in range(1, counts.get("replace", 0) + 1)]
    points += [("rmtree", i) for i in range(1, counts["rmtree"] + 1)]
    points += [("fsync", i) for i in sorted({1, counts["fsync"] // 2, counts["fsync"]})]
    points += [("unlink", i) for i in sorted({1, counts["unlink"]})]
    assert counts["rename"] >= 2 and len(points) >= 8
    outcomes = set()
    for operation, index in points:
        root = prepare(tmp_path / f"{operation}-{index}")
        killed_run(TOKENIZE, operation, index, [str(new_params)], root)
        dataset = dataset_path(root / "data", 8192)
        outcomes.add("stranded" if not dataset.exists() else "in place")  # killed between the two renames?
        check_dataset(dataset, tokenizer_file(root / "data", 8192), 8192)  # recovers, then holds it to its manifest
        found = snapshot(root / "data" / "datasets")
        assert found in (built["old"], built["new"]), f"SIGKILL at os.{operation} call {index}: {sorted(found)}"
        outcomes.add("new" if found == built["new"] else "old")
    assert outcomes == {"old", "new", "stranded", "in place"}  # before, inside and after the dataset's commit


COMMIT_SET = KILLER + textwrap.dedent(
    """
    from pathlib import Path
    from pgolf.atomic import stage_outputs
    root = Path(sys.argv[3])
    with stage_outputs() as out:  # a stage's set: a model file, a directory of plots, metrics last
        out.write_bytes(root / "out" / "model.pt", b"new model")
        plots = out.path(root / "out" / "plots")
        plots.mkdir()
        (plots / "c.csv").write_text("new c\\n")
        out.write_bytes(root / "out" / "metrics.json", b"new metrics")
    """
)


def test_sigkill_at_every_step_of_a_commit_of_several_outputs_leaves_the_old_or_the_new_set(tmp_path):
    """The journal: a kill between two renames of one commit is rolled back by the next recover of any output."""
    new = {"out/metrics.json": b"new metrics", "out/model.pt": b"new model", "out/plots/c.csv": b"new c\n"}

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    reference = tmp_path / "reference"
    write_previous(reference)
    old = files(reference)
    counts = call_counts(COMMIT_SET, [str(reference)], tmp_path)
    assert files(reference) == new
    assert counts["rename"] >= 2 and counts["replace"] >= 2 and counts["link"] >= 2  # plots aside and in, files
    points = [(operation, index) for operation, calls in counts.items() for index in range(1, calls + 1)]
    outcomes = set()
    for operation, index in points:
        root = tmp_path / f"{operation}-{index}"
        write_previous(root)
        killed_run(COMMIT_SET, operation, index, [str(root)], tmp_path)
        recover(root / "out" / "metrics.json")  # any output of the set: its journal brings back the whole set
        found = {name: data for name, data in files(root).items() if "/." not in name}  # temporaries aside
        assert found in (old, new), f"SIGKILL at os.{operation} call {index}: {found}"
        for name in ("model.pt", "plots", "metrics.json"):  # what a re-run does first for each output
            recover(root / "out" / name)
        assert files(root) == found and not list(root.rglob(".*")), f"leftovers after os.{operation} {index}"
        outcomes.add("new" if found == new else "old")
    assert outcomes == {"old", "new"}
