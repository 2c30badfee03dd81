"""``pgolf download`` against a stand-in of the Hugging Face hub on 127.0.0.1 (no other network).

The stand-in answers the requests ``huggingface_hub.hf_hub_download`` makes of
the real hub: ``HEAD`` and ``GET`` on ``/datasets/REPO/resolve/REVISION/PATH``
with the ``X-Repo-Commit`` and ``ETag`` headers, a redirect to a content
address for large (LFS) files with their sha256 and size in ``X-Linked-Etag``
and ``X-Linked-Size``, and ``Range`` requests. It serves a real tiny dataset:
shards and a tokenizer made by the tokenize stage from the embedded corpus, in
the challenge's repository layout with its ``manifest.json``; beside them the
frontier's CaseOps variant as its repository lays it out (shards, byte sidecar
with ``val_bytes_glob``, the record's tokenizer), made the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytest.importorskip("huggingface_hub", reason="pgolf download needs the download extra: pip install -e '.[download]'")

import huggingface_hub.constants  # noqa: E402
from huggingface_hub.utils.sha import git_hash  # noqa: E402

from pgolf.config import TokenizeConfig  # noqa: E402
from pgolf.data import download  # noqa: E402
from pgolf.data.accounting import load_validation_stream  # noqa: E402
from pgolf.data.dataset import build_dataset  # noqa: E402
from pgolf.fingerprint import dataset_identity  # noqa: E402
from stages import download as download_stage  # noqa: E402
from stages import tokenize  # noqa: E402
from tests.data.test_caseops import CASEOPS_TOKENIZER  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_ID = "stand-in/parameter-golf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VOCAB = 1024
DATASET = f"fineweb10B_sp{VOCAB}"
TRAIN_SHARDS = 5  # of the 6 the stand-in has: a prefix, as the record takes 128 of the published shards
SHARD_PREFIX = f"datasets/datasets/{DATASET}/"
MODEL = f"datasets/tokenizers/fineweb_{VOCAB}_bpe.model"
CASEOPS = download.CASEOPS_VARIANT
CASEOPS_DATASET = f"fineweb10B_{CASEOPS}"
CASEOPS_PREFIX = f"datasets/datasets/{CASEOPS_DATASET}/"
CASEOPS_MODEL_NAME = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, bytes]:
    """The repository's files (path -> content): 1 val and 6 train shards, the tokenizer, the manifest."""
    work = tmp_path_factory.mktemp("published")
    (work / "shards").mkdir()
    cfg = TokenizeConfig(vocab_size=VOCAB, num_val_docs=40, embedded_max_docs=200, shard_size=4500, num_workers=1)
    stats = build_dataset(cfg, work / "model", work / "shards")["splits"]
    files = {SHARD_PREFIX + p.name: p.read_bytes() for p in sorted((work / "shards").glob("*.bin"))}
    files[MODEL] = (work / "model").read_bytes()
    files["datasets/tokenizers/fineweb_1024_bpe.vocab"] = b"not fetched: pgolf needs only the .model\n"
    (work / "caseops").mkdir()
    caseops_cfg = TokenizeConfig(tokenizer_path=str(CASEOPS_TOKENIZER), text_transform="caseops", num_val_docs=40,
                                 embedded_max_docs=120, shard_size=3000, num_workers=1)
    caseops = build_dataset(caseops_cfg, work / "caseops.model", work / "caseops")["splits"]
    files |= {CASEOPS_PREFIX + p.name: p.read_bytes() for p in sorted((work / "caseops").glob("*.bin"))}
    files[f"datasets/tokenizers/{CASEOPS_MODEL_NAME}"] = CASEOPS_TOKENIZER.read_bytes()
    manifest = {
        "datasets": [{"name": DATASET, "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_val": len(stats["val"]["files"]), "files_train": len(stats["train"]["files"])}},
                     {"name": CASEOPS_DATASET, "tokenizer_name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved",
                      "val_bytes_glob": f"datasets/{CASEOPS_DATASET}/fineweb_val_bytes_*.bin",
                      "stats": {"files_val": len(caseops["val"]["files"]),
                                "files_train": len(caseops["train"]["files"])}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": f"tokenizers/fineweb_{VOCAB}_bpe.model",
                        "vocab_path": f"tokenizers/fineweb_{VOCAB}_bpe.vocab"},
                       {"name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved",
                        "model_path": f"tokenizers/{CASEOPS_MODEL_NAME}",
                        "text_transform": "lossless_caps_caseops_v1"}],
    }
    files["datasets/manifest.json"] = json.dumps(manifest).encode()
    assert len(stats["val"]["files"]) == 1 and len(stats["train"]["files"]) == TRAIN_SHARDS + 1
    assert len(caseops["val"]["files"]) == 2 and len(caseops["train"]["files"]) >= 2
    return files


class StandInHub:
    """A hub serving ``files`` of one dataset repository at one commit, logging every request.

    Two servers on 127.0.0.1: the hub itself and, on another port (another
    origin, as the real hub's CDN is), the content addresses large files
    redirect to.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.commit = COMMIT  # what "main" resolves to; a test may publish a new commit
        self.path_of_sha256 = {hashlib.sha256(data).hexdigest(): path for path, data in files.items()}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, repository path, Range header)
        self.cut_once: dict[str, int] = {}  # path -> bytes sent before the first GET's connection drops
        self.stall: dict[str, int] = {}  # path -> bytes sent before the GET hangs until `release`
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.corrupt: set[str] = set()  # paths served with one byte of the body changed
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), HubHandler) for _ in ("hub", "cdn")]
        for server in self.servers:
            server.daemon_threads = True
            server.hub = self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.servers[1].server_address[1]}"

    def gets(self, since: int = 0) -> list[str]:
        return [path for method, path, _ in self.requests[since:] if method == "GET"]

    def is_large(self, path: str) -> bool:
        return not path.endswith(".json")  # the hub keeps these in git, the rest in LFS


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet: the test reads `requests` instead
        pass

    def do_HEAD(self) -> None:
        self.answer(send_body=False)

    def do_GET(self) -> None:
        self.answer(send_body=True)

    def answer(self, send_body: bool) -> None:
        hub, url_path = self.server.hub, unquote(urlsplit(self.path).path)
        if self.server is hub.servers[1]:
            return self.answer_cdn(url_path, send_body)
        match = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url_path)
        if match is None or match[1] != REPO_ID:
            return self.refuse(404, "RepoNotFound")
        if match[2] not in ("main", hub.commit):
            return self.refuse(404, "RevisionNotFound")
        path = match[3]
        hub.requests.append((self.command, path, self.headers.get("Range")))
        if path not in hub.files:
            return self.refuse(404, "EntryNotFound")
        if hub.is_large(path):  # the real hub redirects large files to a content address
            sha = hashlib.sha256(hub.files[path]).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"{hub.cdn_url}/lfs/{sha}")
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(hub.files[path])))
            self.send_common_headers(0)
            return self.end_headers()
        self.send_content(path, send_body)

    def answer_cdn(self, url_path: str, send_body: bool) -> None:
        """The CDN serves content addresses only."""
        hub = self.server.hub
        content = re.fullmatch(r"/lfs/([0-9a-f]{64})", url_path)
        if content is None or content[1] not in hub.path_of_sha256:
            return self.refuse(404, "EntryNotFound")
        path = hub.path_of_sha256[content[1]]
        hub.requests.append((self.command, path, self.headers.get("Range")))
        self.send_content(path, send_body)

    def send_common_headers(self, length: int) -> None:
        self.send_header("X-Repo-Commit", self.server.hub.commit)
        self.send_header("Content-Length", str(length))

    def refuse(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_common_headers(0)
        self.end_headers()

    def send_content(self, path: str, send_body: bool) -> None:
        hub = self.server.hub
        data = hub.files[path]
        etag = hashlib.sha256(data).hexdigest() if hub.is_large(path) else git_hash(data)  # of what is stored
        if path in hub.corrupt:  # damaged on the way
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"])[1]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_common_headers(len(data) - start)
        self.end_headers()
        if not send_body:
            return
        body = data[start:]
        if (cut := hub.cut_once.pop(path, None)) is not None:
            return self.drop_after(body[:cut])
        if (stall := hub.stall.get(path)) is not None:
            self.wfile.write(body[:stall])
            self.wfile.flush()
            hub.stalled.set()
            hub.release.wait(60)
            return self.drop_after(b"")
        self.wfile.write(body)

    def drop_after(self, part: bytes) -> None:
        self.wfile.write(part)
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


@pytest.fixture
def hub(published) -> Iterator[StandInHub]:
    stand_in = StandInHub(published)
    for server in stand_in.servers:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield stand_in
    stand_in.release.set()
    for server in stand_in.servers:
        server.shutdown()
        server.server_close()


def fetch(hub: StandInHub, dest: Path, train_shards: int = TRAIN_SHARDS, **options) -> dict:
    return download.download_dataset(REPO_ID, f"sp{VOCAB}", train_shards, dest, endpoint=hub.url, **options)


def expected_files(published: dict[str, bytes], dest: Path) -> dict[Path, bytes]:
    names = ["fineweb_val_000000.bin", *(f"fineweb_train_{i:06d}.bin" for i in range(TRAIN_SHARDS))]
    files = {dest / "datasets" / DATASET / name: published[SHARD_PREFIX + name] for name in names}
    files[dest / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"] = published[MODEL]
    return files


def assert_complete(published: dict[str, bytes], dest: Path) -> None:
    for path, data in expected_files(published, dest).items():
        assert path.read_bytes() == data, path
    assert not (dest / "datasets" / DATASET / f"fineweb_train_{TRAIN_SHARDS:06d}.bin").exists()  # only the prefix
    assert not (dest / download.STAGING).exists()


def assert_tokenize_accepts(published: dict[str, bytes], dest: Path, workdir: Path, monkeypatch) -> None:
    """The tokenize stage's shards_path mode validates the download and records what it linked."""
    monkeypatch.chdir(workdir)
    params = workdir / "params.yaml"
    params.write_text(json.dumps({"tokenize": {
        "vocab_size": VOCAB, "shards_path": str(dest / "datasets" / DATASET),
        "tokenizer_path": str(dest / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"), "num_workers": 1,
    }}))
    assert tokenize.main(["--params", str(params)]) == 0
    manifest = json.loads((workdir / "data" / "datasets" / DATASET / "manifest.json").read_text())
    assert manifest["byte_check"]["agree"] and manifest["byte_check"]["documents"] == 40
    assert len(manifest["splits"]["train"]["files"]) == TRAIN_SHARDS
    for name, digest in manifest["input"]["sha256"].items():
        assert digest == hashlib.sha256(published[SHARD_PREFIX + name]).hexdigest()


def test_download_gives_a_dataset_that_tokenize_accepts(hub, published, tmp_path, monkeypatch, capsys):
    dest = tmp_path / "downloads"
    summary = fetch(hub, dest)
    assert summary["commit"] == COMMIT and summary["fetched"] == summary["files"] == TRAIN_SHARDS + 2
    assert summary["bytes"] == sum(len(data) for data in expected_files(published, dest).values())
    assert "in all; 0 already complete" in capsys.readouterr().out  # the disk it needs, said before it starts
    assert_complete(published, dest)
    assert {path for method, path, _ in hub.requests if method == "HEAD"} >= {MODEL, "datasets/manifest.json"}
    assert_tokenize_accepts(published, dest, tmp_path, monkeypatch)


def test_the_download_records_repository_revision_and_hashes_for_run_fingerprints(hub, published, tmp_path):
    dest = tmp_path / "downloads"
    fetch(hub, dest)
    entry = json.loads((dest / "download.json").read_text())[DATASET]
    assert (entry["repo_id"], entry["revision"], entry["variant"]) == (REPO_ID, COMMIT, f"sp{VOCAB}")
    for path, data in expected_files(published, dest).items():
        assert entry["files"][str(path.relative_to(dest))] == {"bytes": len(data),
                                                               "sha256": hashlib.sha256(data).hexdigest()}
    dataset = dest / "datasets" / DATASET
    identity = dataset_identity(dataset)  # what a run on these shards names as their origin
    assert identity["published"] == entry and identity["repository_manifest_sha256"] == hashlib.sha256(
        published["datasets/manifest.json"]).hexdigest()


def test_a_dropped_connection_is_resumed_with_a_range_request(hub, published, tmp_path, monkeypatch):
    # huggingface_hub writes what it received in chunks of 10 MB; this shard is 10 kB
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1000)
    shard = SHARD_PREFIX + "fineweb_train_000001.bin"
    hub.cut_once[shard] = 3000
    fetch(hub, tmp_path)
    ranges = [rng for method, path, rng in hub.requests if method == "GET" and path == shard]
    assert ranges == [None, "bytes=3000-"]  # the whole file, then the rest after the drop
    assert_complete(published, tmp_path)


def test_a_killed_download_resumes_with_only_the_missing_files(hub, published, tmp_path, monkeypatch):
    """Kill the download process in the middle of a shard; a second run fetches only what is missing."""
    stalled = SHARD_PREFIX + "fineweb_train_000002.bin"
    hub.stall[stalled] = 2000
    (tmp_path / "params.yaml").write_text(json.dumps({"tokenize": {"vocab_size": VOCAB}}))
    command = [sys.executable, "-m", "stages.download", "--params", str(tmp_path / "params.yaml"),
               "--train-shards", str(TRAIN_SHARDS), "--repo-id", REPO_ID, "--endpoint", hub.url,
               "--dest", str(tmp_path / "downloads")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf-home")}
    log = tmp_path / "download.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            assert hub.stalled.wait(120), log.read_text()
        finally:
            process.kill()
            process.wait(30)
    hub.stall.clear()
    hub.release.set()
    dest = tmp_path / "downloads"
    done_first = [p for p in expected_files(published, dest) if p.is_file()]
    assert [p.name for p in done_first] == ["fineweb_val_000000.bin", "fineweb_train_000000.bin",
                                            "fineweb_train_000001.bin"]
    assert not (dest / "datasets" / DATASET / "fineweb_train_000002.bin").exists()  # never a partial file in place

    before = len(hub.requests)
    summary = fetch(hub, dest)
    fetched = [Path(path).name for path in hub.gets(before) if path != "datasets/manifest.json"]
    assert fetched == ["fineweb_train_000002.bin", "fineweb_train_000003.bin", "fineweb_train_000004.bin",
                       f"fineweb_{VOCAB}_bpe.model"]
    assert summary["kept"] == 3 and summary["fetched"] == 4
    assert_complete(published, dest)
    assert_tokenize_accepts(published, dest, tmp_path, monkeypatch)

    before = len(hub.requests)
    assert fetch(hub, dest)["fetched"] == 0  # a third run finds everything complete
    assert hub.gets(before) == ["datasets/manifest.json"]


def test_a_file_the_hub_changed_at_the_same_size_is_fetched_again(hub, published, tmp_path, monkeypatch):
    """A new commit changes a shard's bytes but not its size: the rerun reports the new commit, and every file it keeps
    is that commit's; what it verified is recorded, so a third run keeps everything without hashing a byte."""
    fetch(hub, tmp_path)
    shard = SHARD_PREFIX + "fineweb_train_000001.bin"
    changed = bytearray(published[shard])
    changed[-2:] = bytes([changed[-1], changed[-2]])  # two tokens swapped: same size, same header, other content
    assert bytes(changed) != published[shard]
    hub.files = {**published, shard: bytes(changed)}
    hub.path_of_sha256[hashlib.sha256(changed).hexdigest()] = shard
    hub.commit = "fedcba9876543210fedcba9876543210fedcba98"
    before = len(hub.requests)
    summary = fetch(hub, tmp_path)
    assert summary["commit"] == hub.commit
    assert [Path(p).name for p in hub.gets(before) if p != "datasets/manifest.json"] == ["fineweb_train_000001.bin"]
    local = tmp_path / "datasets" / DATASET / "fineweb_train_000001.bin"
    assert local.read_bytes() == bytes(changed)

    hashed = []
    real_sha256 = download.file_sha256
    monkeypatch.setattr(download, "file_sha256", lambda path: hashed.append(path) or real_sha256(path))
    assert fetch(hub, tmp_path)["fetched"] == 0 and hashed == []  # the record vouches for every kept file

    local.write_bytes(published[shard])  # edited in place: same size, the old content, a new modification time
    summary = fetch(hub, tmp_path)
    assert summary["fetched"] == 1 and hashed[0] == local and local.read_bytes() == bytes(changed)


def test_a_corrupt_file_is_refused_and_not_kept(hub, published, tmp_path):
    bad = SHARD_PREFIX + "fineweb_train_000003.bin"
    hub.corrupt.add(bad)
    with pytest.raises(download.DownloadError, match="fineweb_train_000003.bin: downloaded file is wrong .*sha256"):
        fetch(hub, tmp_path)
    assert not (tmp_path / "datasets" / DATASET / "fineweb_train_000003.bin").exists()
    hub.corrupt.clear()
    assert fetch(hub, tmp_path)["kept"] == 4  # val and train 0..2 were kept
    assert_complete(published, tmp_path)


def test_not_enough_disk_is_refused_before_any_shard_is_fetched(hub, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    with pytest.raises(download.DownloadError, match=r"bytes\) needed for 7 files but only 0.00 GB \(10,000 bytes\) free"):
        fetch(hub, tmp_path)
    assert hub.gets() == ["datasets/manifest.json"]


@pytest.mark.parametrize(("variant", "train_shards", "message"), [
    ("sp4096", 1, r"variant sp4096: no entry 'fineweb10B_sp4096' .* \(it lists: fineweb10B_sp1024, fineweb10B_sp8192_"),
    ("sp1024", 7, "fineweb10B_sp1024 has 6 train shards in the repository, 7 asked for"),
    ("byte260", 1, "expected sp<VOCAB_SIZE>"),
    ("sp8192-caseops", 1, "expected sp<VOCAB_SIZE>"),
])
def test_what_the_repository_does_not_have_is_refused(hub, tmp_path, variant, train_shards, message):
    with pytest.raises(download.DownloadError, match=message):
        download.download_dataset(REPO_ID, variant, train_shards, tmp_path, endpoint=hub.url)
    assert not any(path.endswith(".bin") for path in hub.gets())


def test_an_unknown_repository_names_it(hub, tmp_path):
    with pytest.raises(download.DownloadError, match="datasets/manifest.json of dataset repository nobody/nothing"):
        download.download_dataset("nobody/nothing", "sp1024", 1, tmp_path, endpoint=hub.url)


def test_without_huggingface_hub_the_error_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    (tmp_path / "params.yaml").write_text("tokenize: {vocab_size: 1024}\n")
    assert download_stage.main(["--params", str(tmp_path / "params.yaml"), "--dest", str(tmp_path / "d")]) == 2
    assert "pip install -e '.[download]'" in capsys.readouterr().err


# ------------------------------------------------------------------ the frontier's CaseOps variant


def test_the_caseops_variant_lands_validated_with_its_sidecar(hub, published, tmp_path, monkeypatch, capsys):
    """``pgolf download --variant sp8192_lossless_caps_caseops_v1_reserved``: shards, sidecar and tokenizer, checked."""
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"tokenize": {"vocab_size": 8192}}))
    dest = tmp_path / "downloads"
    assert download_stage.main(["--params", str(params), "--variant", CASEOPS, "--train-shards", "2", "--repo-id",
                                REPO_ID, "--endpoint", hub.url, "--dest", str(dest)]) == 0
    printed = capsys.readouterr().out
    assert "tokenize.text_transform: caseops" in printed
    shards = dest / "datasets" / CASEOPS_DATASET
    names = ["fineweb_val_000000.bin", "fineweb_val_000001.bin", "fineweb_val_bytes_000000.bin",
             "fineweb_val_bytes_000001.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert sorted(p.name for p in shards.iterdir()) == sorted(names)
    for name in names:
        assert (shards / name).read_bytes() == published[CASEOPS_PREFIX + name], name
    model = dest / "tokenizers" / CASEOPS_MODEL_NAME
    assert model.read_bytes() == CASEOPS_TOKENIZER.read_bytes()

    # the tokenize stage imports it, sidecar included, and the evaluation reads its bytes from the sidecar
    monkeypatch.chdir(tmp_path)
    params.write_text(json.dumps({"tokenize": {"vocab_size": 8192, "shards_path": str(shards),
                                               "tokenizer_path": str(model), "text_transform": "caseops",
                                               "num_workers": 1}}))
    assert tokenize.main(["--params", str(params)]) == 0
    imported = tmp_path / "data" / "datasets" / "fineweb10B_sp8192"
    manifest = json.loads((imported / "manifest.json").read_text())
    assert manifest["sidecar"]["files"] == names[2:4] and manifest["byte_check"]["documents"] == 40
    stream = load_validation_stream(imported, tmp_path / "data" / "tokenizers" / "fineweb_8192_bpe.model", 8192, 64)
    assert stream.rule == "byte sidecar"


def test_the_caseops_variant_is_fetched_from_its_own_repository_by_default():
    assert download.repository_of(CASEOPS) == "romeerp/parameter-golf-caseops-v1"
    assert download.repository_of("sp8192") == download.DEFAULT_REPO_ID


def test_a_caseops_variant_without_its_sidecar_is_refused(hub, published, tmp_path):
    manifest = json.loads(published["datasets/manifest.json"])
    del manifest["datasets"][1]["val_bytes_glob"]
    hub.files = {**published, "datasets/manifest.json": json.dumps(manifest).encode()}
    with pytest.raises(download.DownloadError, match=f"{CASEOPS_MODEL_NAME} is a CaseOps tokenizer but the "
                                                     f"repository's manifest gives {CASEOPS_DATASET} no byte sidecar"):
        download.download_dataset(REPO_ID, CASEOPS, 1, tmp_path, endpoint=hub.url)
