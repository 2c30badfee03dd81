"""Lineage: the params each number was computed with, and the identity of every file it came from.

A stage run (``Workspace.begin``) keeps a :class:`Lineage`: the values of the params keys the
stage reads (the keys ``pgolf.pipeline.deps`` lists for it in dvc.yaml, defaults filled in)
and their digest, and every input it reads (``Workspace.input``) with its identity: a file's
sha256, a dataset directory's manifest's. An input written by a stage carries that stage's
record (``provenance.json`` beside it, whose ``lineage.outputs`` names the same identity):
its params and the files and stages it came from join this run's, so a record names the
whole chain behind it, not only the last step. Reading an input whose chain gives a file
another identity than this run's other inputs did (a hand-trained model beside the
pipeline's Hessians of another model) is refused, naming both; a params file that sets a
``model:`` or ``tokenize:`` key otherwise than the stages that made the inputs is refused
(the result would not be what its params say), any other such key is warned about. The
stage ends by writing its record last in its transaction (:meth:`Lineage.commit`), with the
identity of every output it wrote, and stamps its metrics with the params digest and, for
a score, the validation targets it covers (:meth:`Lineage.stamp`).

The export reads a set of records back (:func:`consistent_set`): every file named anywhere
in their chains, and the file present, must have one identity, and every stage's params
must be the ones the exported script bakes (:func:`check_baked`). This is infrastructure
(``pgolf.pipeline.deps.INFRASTRUCTURE``): it records how outputs were made, never changes
one, and a digest is the same for the same params, so ``dvc metrics diff`` stays quiet.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.atomic import StageOutputs, stage_outputs
from pgolf.config import SECTIONS, ConfigError, section, to_dict
from pgolf.data.shards import MANIFEST_NAME, file_sha256, read_header, shard_files
from pgolf.pipeline import layout

PROVENANCE_NAME = "provenance.json"  # every stage's record, beside its outputs (layout.*_PROVENANCE)
# keys whose mismatch with the inputs' makes a result mean something else than its params say
LABEL_SECTIONS = ("model", "tokenize")
SHORT = 12  # hex digits of a digest in messages and tables


class MixedInputs(ValueError):
    """Inputs whose lineages give one file two identities: outputs of different runs mixed."""


def digest(values: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``values``."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def declared_keys(stage: str) -> list[str]:
    """``section.key`` of every param the stage's module reads: what dvc.yaml lists for it (plus its command's)."""
    from pgolf.cli import STAGE_MODULES
    from pgolf.pipeline.deps import params_read

    module = STAGE_MODULES.get(stage)
    return sorted(params_read(f"stages/{module}.py")) if module else []


def resolved(keys: list[str], params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each key's value in ``params``, the section's default where the file leaves it out (as JSON has it)."""
    sections = {name: to_dict(section(params, name, SECTIONS[name])) for name in {key.split(".")[0] for key in keys}}
    values = {key: sections[key.split(".")[0]][key.split(".", 1)[1]] for key in keys}
    return json.loads(json.dumps(values))  # tuples as lists: as a record read back holds them


def defaulted(keys: list[str], params: dict[str, dict[str, Any]]) -> list[str]:
    """The keys ``params`` (a params file with its ``--set``) leaves to the defaults."""
    return [key for key in keys if key.split(".", 1)[1] not in (params.get(key.split(".")[0]) or {})]


def explicit(params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every key the params file (with its ``--set``) gives, with its value as a record holds it."""
    keys = [f"{name}.{key}" for name, values in params.items() for key in values or {}]
    return resolved(keys, params)


def identity(path: Path) -> str | None:
    """A file's sha256; a directory's manifest's, else of its files' names and hashes; None when absent."""
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    if (path / MANIFEST_NAME).is_file():
        return file_sha256(path / MANIFEST_NAME)
    listing = "".join(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n" for f in sorted(path.rglob("*"))
                      if f.is_file())
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def logical(path: Path, root: Path) -> str:
    """The pipeline path of ``path``, written under ``root``."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()  # outside the workspace (an absolute data_dir): the path itself


def record_path(name: str) -> str:
    """Where the record of the stage that writes pipeline path ``name`` lies: beside it, or tokenize's for data."""
    parts = Path(name).parts
    if len(parts) > 2 and parts[0] == layout.OUT_DIR:
        return Path(parts[0], parts[1], PROVENANCE_NAME).as_posix()
    return layout.TOKENIZE_PROVENANCE


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def producer(name: str, root: Path, ident: str) -> tuple[Path, dict[str, Any]] | None:
    """The record (and its path) of the run that wrote pipeline path ``name`` with identity ``ident``.

    The run's own directory is searched first, then the pipeline's; a record that describes
    another version of the file (an older or later run) is not it.
    """
    for candidate in dict.fromkeys((root / record_path(name), Path(record_path(name)))):
        record = read_record(candidate)
        if record and ((record.get("lineage") or {}).get("outputs") or {}).get(name) == ident:
            return candidate, record
    return None


def short(ident: str | None) -> str:
    return "absent" if ident is None else ident[:SHORT]


def targets_text(targets: int | None, split: int | None) -> str:
    """``31,488 of 31,499`` (the validation split's targets), or – for a figure that scores nothing."""
    if targets is None:
        return "–"
    return f"{targets:,}" + (f" of {split:,}" if split is not None else "")


def main_process() -> bool:
    """Whether this process speaks for the run: the only one, or rank 0 under torchrun."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class Chain:
    """The files and stages behind one input (or a whole run): each file's identity and who says so."""

    files: dict[str, str] = field(default_factory=dict)  # pipeline path -> identity
    witness: dict[str, str] = field(default_factory=dict)  # pipeline path -> the file or record it was seen in
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> {params_digest, params}

    def clashes(self, other: Chain) -> list[str]:
        """One line per file the two chains give different identities."""
        return [f"{name}: {short(self.files[name])} in {self.witness[name]}, {short(ident)} in {other.witness[name]}"
                for name, ident in other.files.items() if name in self.files and self.files[name] != ident]

    def join(self, other: Chain) -> None:
        for name, ident in other.files.items():
            self.files.setdefault(name, ident)
            self.witness.setdefault(name, other.witness[name])
        for stage, made in other.stages.items():
            self.stages.setdefault(stage, made)


def input_chain(name: str, found: Path, ident: str, root: Path) -> Chain:
    """The chain behind input ``name`` read at ``found``: itself and, when its record is found, all behind it."""
    chain = Chain({name: ident}, {name: str(found)})
    made = producer(name, root, ident)
    if made is None:
        return chain
    path, record = made
    lineage = record["lineage"]
    for upstream, upstream_ident in (lineage.get("files") or {}).items():
        chain.files.setdefault(upstream, upstream_ident)
        chain.witness.setdefault(upstream, str(path))
    chain.stages = {**(lineage.get("stages") or {}),
                    record["stage"]: {"params_digest": record.get("params_digest"), "params": record.get("params", {})}}
    return chain


@dataclass
class Lineage:
    """One stage run's params and inputs, checked as they are read; its record and stamps at the end."""

    stage: str
    root: Path
    source: str  # the params file read (or "params" for a mapping given in code)
    params: dict[str, Any]  # the keys the stage reads, resolved
    given: dict[str, Any]  # the keys the params file gives
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)  # pipeline path -> {path, sha256}
    chain: Chain = field(default_factory=Chain)
    warned: set[str] = field(default_factory=set)

    @classmethod
    def start(cls, stage: str, root: Path, params: dict[str, dict[str, Any]]) -> Lineage:
        return cls(stage, root, getattr(params, "source", "params"), resolved(declared_keys(stage), params),
                   explicit(params))

    @property
    def digest(self) -> str:
        return digest(self.params)

    def read(self, name: str, found: Path) -> None:
        """Input ``name``, read at ``found``: refused when its chain clashes with this run's or its params' label."""
        chain = self._chain(name, found)
        if chain is None:
            return
        clashes = self.chain.clashes(chain)
        if clashes:
            raise MixedInputs(f"{found} is not from the run this {self.stage}'s other inputs come from (one file, two "
                              f"versions: {'; '.join(clashes)}): a file changed since, or a hand run's outputs mixed "
                              "with others; make every input in one run directory (--out), or run again the stages "
                              "that read the old version")
        self._check_label(chain, found)
        self._take(name, found, chain)

    def compare(self, name: str, found: Path) -> bool:
        """Whether ``found`` (figures to compare with: prequant's for the tax) comes from this run's inputs.

        When it does it joins the lineage; when not, this says so and the caller leaves the comparison out.
        """
        chain = self._chain(name, found)
        if chain is None:
            return True
        clashes = self.chain.clashes(chain)
        if clashes:
            self._say(f"{found} was computed from other inputs ({'; '.join(clashes)}): not compared")
            return False
        self._take(name, found, chain)
        return True

    def stamp(self, metrics: dict[str, Any], targets: int | None = None, dataset: Path | None = None
              ) -> dict[str, Any]:
        """``metrics`` with the params digest and, for a score, its targets and the validation split's."""
        stamped = {**metrics, "params_digest": self.digest}
        if targets is not None and dataset is not None:
            stamped |= {"targets": targets,
                        "split_targets": sum(read_header(path) for path in shard_files(dataset, "val")) - 1}
        return stamped

    def commit(self, out: StageOutputs, dest: Path, record: dict[str, Any]) -> None:
        """Write the stage's record to ``dest``, last in its transaction ``out``: params, inputs, outputs, chain."""
        outputs = {logical(final, self.root): identity(tmp) for tmp, final in out.pending()}
        out.write_json(dest, {**record, "params": self.params, "params_digest": self.digest, "lineage": {
            "inputs": self.inputs, "outputs": outputs, "files": dict(sorted(self.chain.files.items())),
            "stages": self.chain.stages}})

    def commit_score(self, metrics_path: Path, metrics: dict[str, Any], dataset: Path, provenance_path: Path,
                     record: dict[str, Any]) -> None:
        """A scoring stage's one commit: its metrics with the targets it scored, then its record."""
        with stage_outputs() as out:
            out.write_json(metrics_path, self.stamp(metrics, metrics["val_tokens"], dataset))
            self.commit(out, provenance_path, record)

    def _chain(self, name: str, found: Path) -> Chain | None:
        if found.name == PROVENANCE_NAME or name in self.inputs:
            return None  # a record describes inputs and is none itself; a file read twice is one input
        ident = identity(found)
        return None if ident is None else input_chain(name, found, ident, self.root)

    def _take(self, name: str, found: Path, chain: Chain) -> None:
        self.inputs[name] = {"path": found.as_posix(), "sha256": chain.files[name]}
        self.chain.join(chain)

    def _check_label(self, chain: Chain, found: Path) -> None:
        """Refuse model/tokenize keys the params give otherwise than the inputs were made with; warn for the rest."""
        differ: dict[str, str] = {}
        for stage, made in chain.stages.items():
            for key, value in (made.get("params") or {}).items():
                if key in self.given and key not in self.params and self.given[key] != value:
                    differ.setdefault(key, f"{key}={json.dumps(self.given[key])} ({stage} used {json.dumps(value)})")
        label = [text for key, text in sorted(differ.items()) if key.split(".")[0] in LABEL_SECTIONS]
        if label:
            raise ConfigError(f"{self.source} sets {', '.join(label)}, but {found} was made otherwise: this {self.stage} "
                              "would not compute what its params say; give the params its inputs were made with, or "
                              "make them with these params first (in their own --out directory)")
        rest = [text for key, text in sorted(differ.items()) if key not in self.warned]
        self.warned |= set(differ)
        if rest:
            self._say(f"warning: {self.source} sets {', '.join(rest)}, but {found} was made otherwise; this "
                      f"{self.stage} does not remake it")

    def _say(self, text: str) -> None:
        if main_process():
            print(f"[pgolf {self.stage}] {text}", file=sys.stderr, flush=True)


def consistent_set(records: dict[str, Path], locate: Callable[[str], Path]) -> dict[str, dict[str, Any]]:
    """The records at ``records`` (stage -> path), refused unless every file in their lineage has one identity.

    A file's identity is the one each record says it wrote or read (directly or further up
    its chain) and, when it is there, the one of the file ``locate`` finds for its pipeline
    path; a clash names every version and where it was seen.
    """
    loaded, chain = {}, Chain()
    for stage, path in records.items():
        record = read_record(path)
        if record is None or "lineage" not in record:
            raise MixedInputs(f"{path}: {'not found' if record is None else 'has no lineage (written by an older pgolf)'}"
                              f": run the {stage} stage again (dvc repro, or pgolf {stage} in the hand-run directory)")
        lineage = record["lineage"]
        wrote = {name: f"{path} (wrote it)" for name in lineage["outputs"]}
        read = {name: f"{path} (read it)" for name in lineage["files"]}
        clashes = []
        for files, witness in ((lineage["outputs"], wrote), (lineage["files"], read)):
            seen = Chain(dict(files), witness)
            clashes += chain.clashes(seen)
            chain.join(seen)
        if clashes:
            raise MixedInputs(mixed(clashes))
        loaded[stage] = record
    here = {name: ident for name in chain.files if (ident := identity(locate(name))) is not None}
    on_disk = Chain(here, {name: f"{locate(name)} (present)" for name in here})
    clashes = chain.clashes(on_disk)
    if clashes:
        raise MixedInputs(mixed(clashes))
    return loaded


def mixed(clashes: list[str]) -> str:
    return (f"these outputs come from different runs (one file, two versions: {'; '.join(clashes)}): export one "
            "run's consistent set (run its stages again, or name its directory with --from)")


def stages_of(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every stage behind the records (their own and their chains'), with its params."""
    stages: dict[str, dict[str, Any]] = {}
    for record in records.values():
        stages |= record["lineage"].get("stages") or {}
    return stages | {stage: {"params_digest": record["params_digest"], "params": record["params"]}
                     for stage, record in records.items()}


def check_baked(records: dict[str, dict[str, Any]], baked: dict[str, dict[str, Any]], script: Path) -> None:
    """Refuse a set whose stages ran with other params than ``script`` bakes, naming each key."""
    differ = []
    for stage, made in sorted(stages_of(records).items()):
        for key, value in sorted(made["params"].items()):
            name, option = key.split(".", 1)
            if option in baked.get(name, {}) and json.loads(json.dumps(baked[name][option])) != value:
                differ.append(f"{stage} ran with {key}={json.dumps(value)}, the script bakes "
                              f"{json.dumps(baked[name][option])}")
    if differ:
        raise ValueError(f"{script} does not make these figures: {'; '.join(differ)}: run those stages again with "
                         "the script's params (or bundle the script with theirs)")
