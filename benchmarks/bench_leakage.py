"""Seconds of the validation-leak check (``pgolf.data.leakage.find_leaks``) on challenge-sized data.

It writes a synthetic dataset of the challenge's shape into ``--dir``: 50,000 validation
documents and ``--train-shards`` training shards of 100 M tokens, document lengths resampled
from the published FineWeb sample's (``--sample``, a training shard) and scaled to the
challenge's mean (47,851,520 validation tokens over 50,000 documents), random ids below
8192. Then it times ``find_leaks`` in fresh processes on the validation split with one
training shard and with all of them, so the cost splits into indexing the validation split
and a cost per training shard, and prints the figure for 80 shards (the challenge's 8 B
tokens). The shards are then in the page cache: reading them from disk is extra. Usage::

    python -m benchmarks.bench_leakage --dir /tmp/leak_bench [--train-shards 8] [--repeats 3]
        [--sample ../shared/fineweb/fineweb10B_sp8192/fineweb_train_000000.bin]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from pgolf.data.shards import ShardWriter, read_shard, shard_files, split_documents

SHARD_TOKENS = 100_000_000
VAL_DOCS = 50_000
MEAN_DOC_TOKENS = 47_851_520 / 50_000  # the challenge's validation split (the records' logs: val_tokens)
CHALLENGE_SHARDS = 80
TIMED = "import sys, time; t = time.perf_counter(); from pgolf.data.leakage import find_leaks; " \
        "n = len(find_leaks(sys.argv[1])); print(n, time.perf_counter() - t)"


def write_dataset(directory: Path, sample: Path, train_shards: int, rng: np.random.Generator) -> None:
    lengths = np.array([doc.size for doc in split_documents(np.asarray(read_shard(sample)), 1, sample)])  # [D]

    def draw(n: int) -> np.ndarray:
        return np.maximum(1, (rng.choice(lengths, size=n) * MEAN_DOC_TOKENS / lengths.mean()).astype(np.int64))

    with ShardWriter(directory, SHARD_TOKENS) as writer:
        for n in draw(VAL_DOCS):
            writer.add_document("val", np.concatenate([[1], rng.integers(2, 8192, size=n)]))
        while writer.stats["train"]["tokens"] < train_shards * SHARD_TOKENS:
            for n in draw(100_000):
                writer.add_document("train", np.concatenate([[1], rng.integers(2, 8192, size=n)]))


def timed(directory: Path, repeats: int) -> float:
    """The fastest of ``repeats`` fresh-process runs of find_leaks on ``directory`` (seconds)."""
    seconds = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", TIMED, str(directory)], capture_output=True, text=True, check=True)
        leaks, elapsed = out.stdout.split()
        assert leaks == "0", f"{directory}: {leaks} leaks in random data"
        seconds.append(float(elapsed))
    return min(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--train-shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/fineweb/fineweb10B_sp8192/"
                                                                      "fineweb_train_000000.bin")
    args = parser.parse_args()
    if not (args.dir.is_dir() and shard_files(args.dir, "train")):  # written once, reused by later runs
        write_dataset(args.dir, args.sample, args.train_shards, np.random.default_rng(0))
    one = args.dir / "one_shard"
    one.mkdir(exist_ok=True)
    for path in [*shard_files(args.dir, "val"), shard_files(args.dir, "train")[0]]:
        if not (one / path.name).exists():
            (one / path.name).symlink_to(path)
    files = shard_files(args.dir, "train")
    shards = sum(read_shard(path).size for path in files) / SHARD_TOKENS
    first, all_shards = timed(one, args.repeats), timed(args.dir, args.repeats)
    per_shard = (all_shards - first) / (shards - 1)
    print(f"validation split + 1 shard: {first:.2f} s; + {shards:.1f} shards: {all_shards:.2f} s; "
          f"{per_shard:.3f} s per 100 M-token shard; {CHALLENGE_SHARDS} shards: "
          f"{first + per_shard * (CHALLENGE_SHARDS - 1):.1f} s")


if __name__ == "__main__":
    main()
