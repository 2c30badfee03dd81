"""What the exported script's code bytes are made of, and what each way of cutting them would give.

The bundle stage counts the script as it ships (``pgolf.submit.bundle.script_text``: bootstrap,
plain params, the shaken and minified modules as one compressed stream in base 93). This prints
that count for a params file with the records' coder, brotli-11, then the script's length under
each lever, one at a time, each measured on the same shipped modules:

- the stream: ``lrzip -z -L 9`` (``compress.code_compressor: lrzip``, the exact script), lzma (xz,
  preset 9e) or zstd-22 instead of brotli-11; the modules as JSON rather than concatenated; the
  params compressed with the modules rather than plain; the params' values that differ from the
  defaults alone (``compress.bake_params: changed``, the exact script);
- the text: base 85 (the records' ``base64.b85encode``) instead of base 93, for comparison;
- the source, as upper bounds (not shipped, not run: each drops what a real change might keep):
  module-level names renamed by python-minifier within each module (a real change would have to
  rename across modules); every string literal of more than 12 characters and every f-string
  emptied (the error messages); every ``if`` and conditional expression whose test the baked
  params decide (``cfg.key``, ``not cfg.key``, ``cfg.key <op> constant``) cut to its live branch.

Then what the issue's 30,000 would take, from the smallest exact script (lrzip, changed params), each
step on top of the one before, as upper bounds (definitions dropped, not run; lrzip streams): the
parts of the runner's path that no issue asks of a script (:data:`PIPELINE_PARTS`: the journal of
multi-output transactions, params validation, checkpoint resume, model-file checksums); then the
input checks and the record's evidence that issues 20 and 24 ask of it (:data:`EVIDENCE_PARTS`:
data and leak checks, fingerprints, phase clocks); then every long string. A name
in those lists that the shipped code no longer has stops the benchmark, naming it.

The last line is what the record's 30,000 asks of the modules' stream. Usage::

    python -m benchmarks.bench_code_bytes [--params presets/record.yaml]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import lzma
import math
import operator
from pathlib import Path
from typing import Any

import brotli
import python_minifier

from pgolf.config import load_params
from pgolf.submit.bundle import (
    B93_BLOCK_BYTES,
    B93_BLOCK_CHARS,
    B93_DECODER,
    REPO_ROOT,
    code_bytes,
    lrzip_compress,
    modules_text,
    script_json,
    shipped_files,
)
from pgolf.submit.sections import RunConfigs, run_configs, script_params

ENTRY = ["pgolf/submit/runner.py"]
GOAL_BYTES = 30_000  # the final record's code bytes, rounded (issue 25)
COMPARISONS = {ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
               ast.Eq: operator.eq, ast.NotEq: operator.ne}


# module -> the definitions (``name``, ``Class.method``, ``*`` for the whole module) a step of the 30,000 drops
PIPELINE_PARTS = {
    "pgolf/atomic.py": ["JOURNAL_PREFIX", "_Journal", "_recover_journals", "_roll_back_abandoned",
                        "_Replacement.record", "_Replacement.from_record", "StageOutputs.write_text",
                        "StageOutputs.write_json", "StageOutputs.write_csv", "StageOutputs.pending",
                        "NonFiniteValue", "check_finite_numbers", "_first_non_finite", "csv_text"],
    "pgolf/config.py": ["Range", "_require", "type_hints", "describe", "_check_type", "_check_union",
                        "Section.__post_init__", "ModelConfig.check", "TrainConfig.check", "CalibrateConfig.check",
                        "QuantizeConfig.check", "EvaluateConfig.check", "TTTConfig.check"],
    "pgolf/train/loop.py": ["Trainer.resume", "Trainer.state_dict", "Trainer.save"],
    "pgolf/train/checkpoint.py": ["*"],
    "pgolf/model/files.py": ["payload_checksum", "_digest_value"],
}
EVIDENCE_PARTS = {
    "pgolf/fingerprint.py": ["*"],
    "pgolf/clocks.py": ["*"],
    "pgolf/data/leakage.py": ["*"],
    "pgolf/data/shards.py": ["check_sidecar", "scan_shard", "validate_dataset", "file_sha256"],
}


def baked(configs: RunConfigs, **compress: Any) -> dict[str, Any]:
    """The params a script of ``configs`` carries with these ``compress`` settings (its coder, its params' baking)."""
    return script_params(dataclasses.replace(configs, compress=dataclasses.replace(configs.compress, **compress)))


def text_chars(size: int) -> int:
    """The characters of ``size`` bytes in the script's base 93 text (``b93encode``: the pad's digit, 38 for every 31
    bytes, the last 31 padded)."""
    return 1 + B93_BLOCK_CHARS * math.ceil(size / B93_BLOCK_BYTES)


def b85_chars(size: int) -> int:
    """The characters of ``size`` bytes in base 85 (``base64.b85encode``: 5 for every 4, the last 4 padded)."""
    return 5 * math.ceil(size / 4)


def brotli_bytes(text: str) -> int:
    return len(brotli.compress(text.encode("utf-8"), quality=11))


def stream_alternatives(files: dict[str, str], params_text: str) -> dict[str, int]:
    """The stream's bytes under each coder and layout."""
    text = modules_text(files)
    raw = text.encode("utf-8")
    lzma_filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    found = {"brotli-11": brotli_bytes(text),
             "lzma 9e": len(lzma.compress(raw, format=lzma.FORMAT_RAW, filters=lzma_filters)),
             "brotli-11, modules as JSON": brotli_bytes(script_json(files)),
             "brotli-11, params in the stream": brotli_bytes(params_text + text)}
    try:
        import zstandard
    except ImportError:
        return found
    found["zstd-22"] = len(zstandard.ZstdCompressor(level=22).compress(raw))
    return found


class EmptyStrings(ast.NodeTransformer):
    """Every string literal of more than 12 characters and every f-string, emptied."""

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        return ast.Constant("") if isinstance(node.value, str) and len(node.value) > 12 else node

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        return ast.Constant("")


class LiveBranches(ast.NodeTransformer):
    """Each ``if`` and conditional expression whose test ``values`` (key -> baked value) decide, cut to its live
    branch."""

    def __init__(self, values: dict[str, Any]):
        self.values = values

    def decided(self, test: ast.expr) -> Any:
        """The test's value, or None where the baked params do not decide it."""
        if isinstance(test, ast.Attribute):
            return self.values.get(test.attr)
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            value = self.decided(test.operand)
            return None if value is None else not value
        if (isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in COMPARISONS
                and isinstance(test.comparators[0], ast.Constant)):
            value = self.decided(test.left)
            try:
                return None if value is None else COMPARISONS[type(test.ops[0])](value, test.comparators[0].value)
            except TypeError:
                return None
        return None

    def visit_If(self, node: ast.If) -> Any:
        self.generic_visit(node)
        value = self.decided(node.test)
        if value is None:
            return node
        return (node.body if value else node.orelse) or ast.Pass()

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self.generic_visit(node)
        value = self.decided(node.test)
        return node if value is None else (node.body if value else node.orelse)


def decided_keys(params: dict[str, Any]) -> dict[str, Any]:
    """Each params key with one value in every section that has it (a test on it is decided by the params)."""
    values: dict[str, list[Any]] = {}
    for settings in params.values():
        for key, value in (settings.items() if isinstance(settings, dict) else ()):
            values.setdefault(key, []).append(value)
    return {key: found[0] for key, found in values.items() if all(v == found[0] for v in found)}


def transformed(files: dict[str, str], transformer: ast.NodeTransformer) -> dict[str, str]:
    return {path: ast.unparse(ast.fix_missing_locations(transformer.visit(ast.parse(source)))) if source else source
            for path, source in files.items()}


class Without(ast.NodeTransformer):
    """A module without the top-level definitions and methods ``names`` names (``name`` or ``Class.method``)."""

    def __init__(self, path: str, names: list[str]):
        self.path, self.names, self.found = path, set(names), set()

    def drop(self, body: list[ast.stmt], prefix: str) -> list[ast.stmt]:
        kept = []
        for node in body:
            targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            name = prefix + getattr(node, "name", targets[0] if targets else "")
            if name in self.names:
                self.found.add(name)
                continue
            if isinstance(node, ast.ClassDef):
                node.body = self.drop(node.body, f"{node.name}.") or [ast.Pass()]
            kept.append(node)
        return kept

    def visit_Module(self, node: ast.Module) -> ast.Module:
        node.body = self.drop(node.body, "")
        if self.found != self.names:
            raise SystemExit(f"{self.path}: no {', '.join(sorted(self.names - self.found))} in the shipped code: "
                             "update the parts lists of benchmarks/bench_code_bytes.py")
        return node


def without(files: dict[str, str], parts: dict[str, list[str]]) -> dict[str, str]:
    """``files`` without ``parts`` (module -> names, ``*``: the whole module)."""
    kept = dict(files)
    for path, names in parts.items():
        if path not in kept:
            raise SystemExit(f"{path} is not shipped: update the parts lists of benchmarks/bench_code_bytes.py")
        if names == ["*"]:
            del kept[path]
        else:
            kept[path] = ast.unparse(ast.fix_missing_locations(Without(path, names).visit(ast.parse(kept[path]))))
    return kept


def lrzip_bytes(files: dict[str, str]) -> int:
    return len(lrzip_compress(modules_text(files).encode("utf-8")))


def steps_to_goal(configs: RunConfigs) -> list[tuple[str, int]]:
    """The smallest exact script's code bytes, then the bound after each step toward 30,000, each on the last."""
    params = baked(configs, code_compressor="lrzip", bake_params="changed")
    exact = code_bytes(ENTRY, params, "lrzip")
    files = transformed(shipped_files(ENTRY, params), ast.NodeTransformer())  # unparsed, as every step below
    stream = lrzip_bytes(files)
    around = exact - text_chars(stream)
    steps = [("lrzip, changed params (the exact script)", exact)]
    for name, change in (("the parts no issue asks of a script, out", lambda f: without(f, PIPELINE_PARTS)),
                         ("the input checks and evidence of issues 20 and 24, out",
                          lambda f: without(f, EVIDENCE_PARTS)),
                         ("every long string and f-string emptied", lambda f: transformed(f, EmptyStrings()))):
        files = change(files)
        stream = lrzip_bytes(files)
        steps.append((name, text_chars(stream) + around))
    return steps


def source_bounds(files: dict[str, str], params: dict[str, Any]) -> dict[str, int]:
    """The stream's bytes with each source lever applied alone (unparsed sources, compared with the unparsed
    shipped sources so that the unparser's own layout cancels)."""
    renamed = {path: python_minifier.minify(source, filename=path, rename_globals=True, rename_locals=True,
                                            remove_literal_statements=True) if source else source
               for path, source in files.items()}
    unparsed = transformed(files, ast.NodeTransformer())
    base = brotli_bytes(modules_text(unparsed))
    return {"module-level names renamed, each module alone": brotli_bytes(modules_text(renamed))
            - brotli_bytes(modules_text(files)),
            "long strings and f-strings emptied": brotli_bytes(modules_text(transformed(files, EmptyStrings()))) - base,
            "branches the baked params decide, cut": brotli_bytes(
                modules_text(transformed(files, LiveBranches(decided_keys(params))))) - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "presets" / "record.yaml")
    args = parser.parse_args()
    configs = run_configs(load_params(args.params))
    params = baked(configs, code_compressor="brotli")
    files = shipped_files(ENTRY, params)
    shipped = code_bytes(ENTRY, params, "brotli")
    params_text = script_json(params)
    alternatives = stream_alternatives(files, params_text)
    stream = alternatives["brotli-11"]
    around = shipped - text_chars(stream)  # bootstrap and plain params
    print(f"{args.params}: {shipped:,} code bytes; {len(files)} modules, {sum(map(len, files.values())):,} "
          f"characters shipped; brotli stream {stream:,} bytes; bootstrap + params {around:,}")
    print(f"{'lever':<52} {'stream':>8} {'script':>8} {'change':>8}")
    for name, size in alternatives.items():
        script = text_chars(size) + around - (len(params_text) if "params" in name else 0)
        print(f"{name:<52} {size:>8,} {script:>8,} {script - shipped:>+8,}")
    script = code_bytes(ENTRY, baked(configs, code_compressor="lrzip"), "lrzip")  # decoded by the lrzip program
    print(f"{'lrzip -z -L 9 (compress.code_compressor: lrzip)':<52} {'':>8} {script:>8,} {script - shipped:>+8,}")
    script = code_bytes(ENTRY, baked(configs, code_compressor="brotli", bake_params="changed"), "brotli")
    print(f"{'params: changed values only (bake_params: changed)':<52} {'':>8} {script:>8,} {script - shipped:>+8,}")
    script = b85_chars(stream) + around - len(B93_DECODER)  # and no base 93 decoder in the bootstrap
    print(f"{'base 85 text instead of base 93':<52} {stream:>8,} {script:>8,} {script - shipped:>+8,}")
    for name, change in source_bounds(files, params).items():
        script = text_chars(stream + change) + around
        print(f"{name + ' (bound)':<52} {stream + change:>8,} {script:>8,} {script - shipped:>+8,}")
    needed = (GOAL_BYTES - around - 1) // B93_BLOCK_CHARS * B93_BLOCK_BYTES  # the most bytes whose text fits
    print(f"{GOAL_BYTES:,} code bytes with these params need a stream of {needed:,} bytes: "
          f"{1 - needed / stream:.0%} less than today's")
    print(f"toward {GOAL_BYTES:,}, each step on the one before (bounds from the second on)")
    for name, script in steps_to_goal(configs):
        print(f"{name:<61} {script:>8,}")


if __name__ == "__main__":
    main()
