"""Fetching the challenge's published, already-tokenized FineWeb from the Hugging Face hub.

The challenge publishes its datasets in a hub *dataset* repository whose
``datasets/`` folder holds a ``manifest.json`` (per dataset: its tokenizer and
how many val and train shards it has), the shards under
``datasets/fineweb10B_sp{V}/`` and the tokenizers under ``tokenizers/``. The
sp1024 export is in ``willdepueoai/parameter-golf``; the sp4096 and sp8192
exports of the later records (#1218, #1394) are in ``kevclark/parameter-golf``.
``download_dataset`` reads the manifest, pins the repository's commit so that
every file comes from the same revision, says how much disk the missing files
need against what is free (and refuses before fetching anything when it is not
enough), fetches each missing file with ``huggingface_hub`` (an optional extra)
and checks it (size, the hub's sha256 or git hash, shard headers, the
tokenizer). It writes the layout the tokenize stage validates:
``DEST/datasets/fineweb10B_sp{V}/`` and ``DEST/tokenizers/fineweb_{V}_bpe.model``.
A variant with a suffix, such as the frontier's CaseOps data
``sp8192_lossless_caps_caseops_v1_reserved`` (repository
``romeerp/parameter-golf-caseops-v1``), lands in ``DEST/datasets/fineweb10B_{variant}/``
with its tokenizer under the repository's file name; where the manifest gives the
dataset a ``val_bytes_glob``, the byte sidecar ``fineweb_val_bytes_*.bin`` of every
validation shard comes too, checked against its shard (docs/BYTES.md).

Keeping: a file is kept only if it is what the pinned commit holds. Each file
fetched or found is hashed once against the hub's etag (sha256 or git hash) and
recorded in ``DEST/.download-verified.json`` with its size, modification time and
inode; a later run keeps a file whose record matches the hub's etag at the commit
it reports and whose size, time and inode are unchanged, without hashing it again.
A file the hub changed (same size, other bytes, a new commit) or one edited in
place is fetched again, so the local set is never a mix of two commits.

Resuming: a file appears at its final path only once complete and checked, so a
rerun after an interruption keeps every finished file and fetches only the
rest. Within one run ``huggingface_hub`` (from 1.20) re-requests the remaining
bytes with an HTTP ``Range`` request when a connection drops mid-file. It keeps
no partial file across processes (2.x writes each download to a temporary file
of its own process and deletes it on failure), so the one file a killed process
was fetching starts again from its beginning: at most one shard, 200 MB for
sp8192, is fetched twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pgolf.atomic import write_json
from pgolf.data.shards import (
    DOWNLOAD_RECORD,
    SIDECAR,
    SPLITS,
    ShardError,
    check_sidecar,
    file_sha256,
    read_header,
    shard_name,
)
from pgolf.data.tokenizer import check_reserved_markers, load_tokenizer, marker_pieces, tokenizer_file

DEFAULT_REPO_ID = "kevclark/parameter-golf"  # sp4096 and sp8192; "willdepueoai/parameter-golf" has sp1024
REMOTE_ROOT = "datasets"  # the repository folder that holds the export (the challenge's default)
HUB_MANIFEST = "manifest.json"
STAGING = ".download"  # under the destination: huggingface_hub's working folder, removed when done
VERIFIED = ".download-verified.json"  # under the destination: what each kept file was hashed against
EXTRA_HINT = "pip install -e '.[download]'"
SHA256 = re.compile(r"[0-9a-f]{64}")  # the etag of a large (LFS or Xet) file: its content's sha256
GIT_SHA1 = re.compile(r"[0-9a-f]{40}")  # the etag of a small file stored in git: its blob hash


class DownloadError(ValueError):
    """A download that cannot start or did not give what the repository holds."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repository and where it goes locally."""

    remote: str  # path inside the repository
    local: Path  # final path under the destination
    size: int = -1  # bytes, from the hub (-1: not asked yet)
    etag: str = ""  # sha256 or git blob hash of the content, from the hub

    def is_complete(self) -> bool:
        return self.local.is_file() and self.local.stat().st_size == self.size


class Verified:
    """The record of files hashed against an etag (``DEST/.download-verified.json``).

    A file whose size, modification time and inode are those recorded when it was hashed
    still holds that content (a rewrite changes the time, a replacement the inode), so the
    record vouches for it without reading 26 GB again. A missing or unreadable record
    vouches for nothing: the files are hashed again.
    """

    def __init__(self, dest: Path):
        self.path = dest / VERIFIED
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}
        self.entries: dict[str, dict[str, Any]] = entries if isinstance(entries, dict) else {}
        self.dest = dest

    def vouches(self, remote_file: RemoteFile) -> bool:
        """Whether ``remote_file`` is on disk as recorded when it was hashed to the hub's etag."""
        entry = self.entries.get(self._key(remote_file))
        if not remote_file.etag or not isinstance(entry, dict):
            return False
        return {key: value for key, value in entry.items() if key != "commit"} == self._facts(remote_file)

    def record(self, remote_file: RemoteFile, commit: str) -> None:
        """``remote_file`` was just hashed to its etag at ``commit``: keep that, with its size, time and inode."""
        self.entries[self._key(remote_file)] = {**self._facts(remote_file), "commit": commit}
        write_json(self.path, self.entries)

    def _key(self, remote_file: RemoteFile) -> str:
        return str(remote_file.local.relative_to(self.dest))

    @staticmethod
    def _facts(remote_file: RemoteFile) -> dict[str, Any]:
        stat = remote_file.local.stat()
        return {"etag": remote_file.etag, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def hub_module() -> ModuleType:
    """``huggingface_hub``, or an error naming the extra that installs it."""
    try:
        import huggingface_hub
    except ModuleNotFoundError:
        raise DownloadError(
            f"downloading needs the huggingface_hub package, which is not installed: {EXTRA_HINT}"
        ) from None
    return huggingface_hub


CASEOPS_REPO_ID = "romeerp/parameter-golf-caseops-v1"  # the frontier's CaseOps export (docs/BYTES.md)
CASEOPS_VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"


def vocab_size_of(variant: str) -> int:
    match = re.fullmatch(r"sp(\d+)(_[a-z0-9_]+)?", variant)
    if match is None:
        raise DownloadError(f"variant {variant!r}: expected sp<VOCAB_SIZE> (sp1024, sp4096, sp8192) or such a name "
                            f"with a suffix ({CASEOPS_VARIANT})")
    return int(match.group(1))


def repository_of(variant: str) -> str:
    """The repository that publishes ``variant``: the CaseOps export's own, else the challenge's."""
    return CASEOPS_REPO_ID if variant == CASEOPS_VARIANT else DEFAULT_REPO_ID


def local_dataset_dir(dest: Path, variant: str) -> Path:
    """Where a variant's shards go: ``DEST/datasets/fineweb10B_{variant}`` (the challenge's names)."""
    return dest / "datasets" / f"fineweb10B_{variant}"


def local_tokenizer(dest: Path, variant: str, model_path: str) -> Path:
    """``fineweb_{V}_bpe.model`` for a plain variant; a suffixed one keeps the repository's file name."""
    if re.fullmatch(r"sp\d+", variant):
        return tokenizer_file(dest, vocab_size_of(variant))
    return dest / "tokenizers" / Path(model_path).name


class Hub:
    """The few hub calls a download makes, each turning a failure into one line naming the file."""

    def __init__(self, repo_id: str, endpoint: str | None, staging: Path):
        self.api = hub_module()
        self.repo_id, self.endpoint, self.staging = repo_id, endpoint, staging

    def where(self, remote: str) -> str:
        return f"{remote} of dataset repository {self.repo_id} at {self.endpoint or 'the default hub endpoint'}"

    def metadata(self, remote: str, revision: str) -> Any:
        """Size, etag and commit of one file (one HEAD request)."""
        url = self.api.hf_hub_url(self.repo_id, remote, repo_type="dataset", revision=revision, endpoint=self.endpoint)
        try:
            return self.api.get_hf_file_metadata(url, endpoint=self.endpoint)
        except Exception as exc:  # network and hub errors come in many types; each ends this run the same way
            raise DownloadError(f"{self.where(remote)}: {exc}") from None

    def fetch(self, remote: str, revision: str) -> Path:
        """Download one file into the staging folder; return its path there."""
        try:
            path = self.api.hf_hub_download(
                self.repo_id, remote, repo_type="dataset", revision=revision,
                local_dir=self.staging, endpoint=self.endpoint,
            )
        except Exception as exc:  # as above; a rerun resumes after the files already complete
            raise DownloadError(f"{self.where(remote)}: {exc} (run the command again to resume)") from None
        return Path(path)


def download_dataset(
    repo_id: str = DEFAULT_REPO_ID,
    variant: str = "sp8192",
    train_shards: int = 128,
    dest_dir: str | Path = "downloads",
    endpoint: str | None = None,
    *,
    remote_root: str = REMOTE_ROOT,
    revision: str = "main",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fetch the val shards, the first ``train_shards`` train shards and the tokenizer of ``variant``.

    Returns a summary: the commit, the local dataset and tokenizer paths,
    files fetched and kept, and bytes in all.
    """
    vocab_size = vocab_size_of(variant)
    if train_shards < 1:
        raise DownloadError(f"train_shards must be at least 1, got {train_shards}")
    dest = Path(dest_dir)
    hub = Hub(repo_id, endpoint, dest / STAGING)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(hub.staging, ignore_errors=True)  # a killed run's partial files cannot be reused

    commit, manifest = fetch_hub_manifest(hub, remote_root, revision, dest)
    planned = planned_files(manifest, variant, train_shards, remote_root, dest)
    files = [with_metadata(hub, f, commit) for f in planned]
    verified = Verified(dest)
    missing = [f for f in files if not kept(f, verified, commit, log)]
    check_disk_space(files, missing, dest, log)
    for number, remote_file in enumerate(missing, 1):
        log(f"[pgolf download] {number}/{len(missing)} {remote_file.remote} ({remote_file.size / 1e6:,.1f} MB)")
        fetch_checked(hub, remote_file, commit)
        verified.record(remote_file, commit)
    shutil.rmtree(hub.staging, ignore_errors=True)

    shards_dir, model_file = local_dataset_dir(dest, variant), planned[-1].local
    transform = check_dataset(files, shards_dir, model_file, vocab_size)
    record_download(dest, shards_dir.name, {"repo_id": repo_id, "revision": commit, "variant": variant,
                                            "remote_root": remote_root, "files": file_hashes(files, dest)})
    return {
        "repo_id": repo_id, "commit": commit, "variant": variant, "text_transform": transform,
        "shards_path": str(shards_dir), "tokenizer_path": str(model_file),
        "files": len(files), "fetched": len(missing), "kept": len(files) - len(missing),
        "bytes": sum(f.size for f in files),
    }


def file_hashes(files: list[RemoteFile], dest: Path) -> dict[str, dict[str, Any]]:
    """Each file (relative to ``dest``) with its size and the hash the hub gave and the download checked."""
    def entry(remote_file: RemoteFile) -> dict[str, Any]:
        kind = "sha256" if SHA256.fullmatch(remote_file.etag) else "git_blob_sha1" \
            if GIT_SHA1.fullmatch(remote_file.etag) else "etag"
        return {"bytes": remote_file.size, kind: remote_file.etag}
    return {str(f.local.relative_to(dest)): entry(f) for f in files}


def record_download(dest: Path, dataset: str, entry: dict[str, Any]) -> None:
    """Set ``dataset``'s entry of ``DEST/download.json``: what a run's fingerprint names as its data's origin."""
    path = dest / DOWNLOAD_RECORD
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    write_json(path, {**record, dataset: entry})


def fetch_hub_manifest(hub: Hub, remote_root: str, revision: str, dest: Path) -> tuple[str, dict[str, Any]]:
    """The commit ``revision`` names now (every file is then fetched at it) and the repository's manifest."""
    remote = f"{remote_root}/{HUB_MANIFEST}" if remote_root else HUB_MANIFEST
    meta = hub.metadata(remote, revision)
    manifest_file = with_metadata(hub, RemoteFile(remote, dest / HUB_MANIFEST), revision, meta)
    fetch_checked(hub, manifest_file, meta.commit_hash)
    return meta.commit_hash, read_hub_manifest(manifest_file.local)


def kept(remote_file: RemoteFile, verified: Verified, commit: str, log: Callable[[str], None]) -> bool:
    """Whether the local copy of ``remote_file`` is the hub's at ``commit``: vouched for by the record, or
    hashed now to the hub's etag (then recorded). A file of the wrong size or content is fetched again."""
    if not remote_file.is_complete():
        return False
    if verified.vouches(remote_file):
        return True
    log(f"[pgolf download] hashing {remote_file.local} ({remote_file.size / 1e6:,.1f} MB) against commit {commit[:12]}")
    if content_mismatch(remote_file.local, remote_file.etag):
        log(f"[pgolf download] {remote_file.local}: not the hub's file at commit {commit[:12]}: fetching it again")
        return False
    verified.record(remote_file, commit)
    return True


def fetch_checked(hub: Hub, remote_file: RemoteFile, commit: str) -> None:
    fetched = hub.fetch(remote_file.remote, commit)
    verify_file(fetched, remote_file)
    place(fetched, remote_file.local)


def read_hub_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DownloadError(f"{path}: the repository's manifest is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), list):
        raise DownloadError(f"{path}: the repository's manifest has no 'datasets' list")
    return manifest


def planned_files(
    manifest: dict[str, Any], variant: str, train_shards: int, remote_root: str, dest: Path
) -> list[RemoteFile]:
    """Every val shard (and its byte sidecar, if the dataset has one), the first ``train_shards`` train shards and
    the tokenizer ``.model`` (last)."""
    vocab_size_of(variant)
    local_dir = local_dataset_dir(dest, variant)
    name = local_dir.name
    entry = find_entry(manifest, "datasets", name, f"variant {variant}")
    stats = entry.get("stats") or {}
    available = {split: int(stats.get(f"files_{split}", 0)) for split in SPLITS}
    if available["val"] < 1:
        raise DownloadError(f"the repository's manifest lists no validation shards for {name}")
    if train_shards > available["train"]:
        raise DownloadError(f"{name} has {available['train']} train shards in the repository, {train_shards} asked for")
    root = f"{remote_root}/" if remote_root else ""
    counts = {"val": available["val"], "train": train_shards}
    if entry.get("val_bytes_glob"):  # the record's export names its byte sidecar so
        counts = {"val": available["val"], SIDECAR: available["val"], "train": train_shards}
    shards = [
        RemoteFile(f"{root}datasets/{name}/{shard_name(split, i)}", local_dir / shard_name(split, i))
        for split in counts for i in range(counts[split])
    ]
    tokenizer = find_entry(manifest, "tokenizers", entry.get("tokenizer_name"), f"the tokenizer of {name}")
    model_path = tokenizer.get("model_path")
    if not model_path:
        raise DownloadError(f"the repository's manifest gives no model_path for tokenizer {tokenizer['name']}")
    return [*shards, RemoteFile(f"{root}{model_path}", local_tokenizer(dest, variant, model_path))]


def find_entry(manifest: dict[str, Any], key: str, name: Any, what: str) -> dict[str, Any]:
    for entry in manifest.get(key) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    listed = ", ".join(str(e.get("name")) for e in manifest.get(key) or [] if isinstance(e, dict))
    raise DownloadError(f"{what}: no entry {name!r} in the repository manifest's {key} (it lists: {listed or 'none'})")


def with_metadata(hub: Hub, remote_file: RemoteFile, revision: str, meta: Any = None) -> RemoteFile:
    """``remote_file`` with the size and etag the hub gives (``meta``: already asked for)."""
    meta = meta or hub.metadata(remote_file.remote, revision)
    if meta.size is None:
        raise DownloadError(f"{hub.where(remote_file.remote)}: the hub gave no size")
    return RemoteFile(remote_file.remote, remote_file.local, int(meta.size), meta.etag or "")


def check_disk_space(
    files: list[RemoteFile], missing: list[RemoteFile], dest: Path, log: Callable[[str], None]
) -> None:
    """Say what the missing files need against what is free; refuse when it does not fit."""
    needed = sum(f.size for f in missing)
    free = shutil.disk_usage(dest).free
    log(
        f"[pgolf download] {len(files)} files, {size_text(sum(f.size for f in files))} in all; "
        f"{len(files) - len(missing)} already complete; {len(missing)} to fetch need {size_text(needed)}; "
        f"{size_text(free)} free on {dest}"
    )
    if needed > free:
        raise DownloadError(
            f"{dest}: {size_text(needed)} needed for {len(missing)} files but only {size_text(free)} free; "
            "free some space or choose another --dest (or fewer --train-shards)"
        )


def size_text(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:,.2f} GB ({num_bytes:,} bytes)"


def verify_file(path: Path, expected: RemoteFile) -> None:
    """Size and, where the hub's etag is one, content hash; a bad file is removed."""
    actual = path.stat().st_size
    if actual != expected.size:
        problem = f"{actual} bytes, the hub says {expected.size}"
    else:
        problem = content_mismatch(path, expected.etag)
    if problem:
        path.unlink()
        raise DownloadError(f"{expected.remote}: downloaded file is wrong ({problem}); run the command again")


def content_mismatch(path: Path, etag: str) -> str:
    """Why ``path`` does not hash to ``etag`` ('' when it does, or when the etag is no content hash)."""
    if SHA256.fullmatch(etag):
        digest, kind = file_sha256(path), "sha256"
    elif GIT_SHA1.fullmatch(etag):
        from huggingface_hub.utils.sha import git_hash  # present: the file came through huggingface_hub

        digest, kind = git_hash(path.read_bytes()), "git blob hash"  # git stores only small files
    else:
        return ""
    return "" if digest == etag else f"{kind} {digest}, the hub says {etag}"


def place(fetched: Path, local: Path) -> None:
    """Move a checked file to its final path (same file system: a rename, never a copy)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    os.replace(fetched, local)


def check_dataset(files: list[RemoteFile], shards_dir: Path, model_file: Path, vocab_size: int) -> str:
    """Every file at its size, every shard header valid, the tokenizer loadable with ``vocab_size``; the transform.

    A tokenizer holding CaseOps markers (then ``caseops``, else ``none``) must keep them as ids
    4..7 and come with a byte sidecar that matches the validation shards. The tokenize
    stage's ``shards_path`` mode later checks every id and the byte accounting.
    """
    for remote_file in files:
        if not remote_file.is_complete():
            raise DownloadError(f"{remote_file.local}: missing or not {remote_file.size} bytes after the download")
    try:
        for path in sorted(shards_dir.glob("fineweb_*.bin")):  # earlier runs' extra shards too: tokenize reads them
            read_header(path)
        sidecar = check_sidecar(shards_dir)
    except ShardError as exc:
        raise DownloadError(f"{exc} (delete the file and run the command again)") from None
    sp = load_tokenizer(model_file, vocab_size)
    if not marker_pieces(sp):
        return "none"
    check_reserved_markers(sp, model_file)
    if not sidecar:
        raise DownloadError(f"{model_file} is a CaseOps tokenizer but the repository's manifest gives "
                            f"{shards_dir.name} no byte sidecar (val_bytes_glob): its scores could not be counted")
    return "caseops"
