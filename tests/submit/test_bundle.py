"""What a submission ships and counts: the exported script, the closure it bundles, its bytes, and the size gate."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pgolf.artifact.size import SizeLimitError, check_size
from pgolf.clocks import Clocks
from pgolf.config import load_params
from pgolf.data.loader import make_loader
from pgolf.data.shards import BOS_ID, write_shard
from pgolf.model.files import save_model
from pgolf.quant.sensitivity import collect_output_sensitivity
from pgolf.submit.bundle import (
    B93_ALPHABET,
    B93_DECODER,
    REPO_ROOT,
    b93decode,
    b93encode,
    code_bytes,
    import_closure,
    minified_source,
    modules_text,
    read_bundle,
    read_modules,
    read_params,
    script_json,
    script_text,
    shipped_files,
)
from pgolf.submit.runner import make_artifact
from pgolf.submit.sections import RunConfigs, run_configs, script_params
from tests.stages.test_quantize import model_with_hessians


def write(root, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_closure_follows_every_project_import_and_nothing_else(tmp_path):
    write(tmp_path, "pgolf/__init__.py", "")
    write(tmp_path, "pgolf/entry.py", "import os\nfrom pgolf.a import f\nimport pgolf.b\n")
    write(tmp_path, "pgolf/a.py", "from pgolf import c\n")
    write(tmp_path, "pgolf/b.py", "import numpy\n")
    write(tmp_path, "pgolf/c.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pgolf import d\n")
    write(tmp_path, "pgolf/d.py", "")  # imported only for annotations: not shipped
    write(tmp_path, "pgolf/unused.py", "")
    assert import_closure(["pgolf/entry.py"], tmp_path) == [
        "pgolf/__init__.py", "pgolf/a.py", "pgolf/b.py", "pgolf/c.py", "pgolf/entry.py"]


def test_the_closure_resolves_subpackages_and_runs_their_inits(tmp_path):
    """``from pgolf.room import module``, ``from pgolf.room.module import f`` and ``import pgolf.room.module``
    each bring the module and every package ``__init__`` above it; a name imported from a module is no file."""
    for name in ("pgolf/__init__.py", "pgolf/room/__init__.py", "pgolf/deep/__init__.py", "pgolf/deep/er/__init__.py"):
        write(tmp_path, name, "")
    write(tmp_path, "pgolf/entry.py", "from pgolf.room import a\nfrom pgolf.room.b import f\nimport pgolf.deep.er.c\n")
    write(tmp_path, "pgolf/room/a.py", "from pgolf.room import helper_name\n")
    write(tmp_path, "pgolf/room/b.py", "def f():\n    pass\n")
    write(tmp_path, "pgolf/deep/er/c.py", "")
    write(tmp_path, "pgolf/room/unused.py", "")
    assert import_closure(["pgolf/entry.py"], tmp_path) == [
        "pgolf/__init__.py", "pgolf/deep/__init__.py", "pgolf/deep/er/__init__.py", "pgolf/deep/er/c.py",
        "pgolf/entry.py", "pgolf/room/__init__.py", "pgolf/room/a.py", "pgolf/room/b.py"]
    assert import_closure(["pgolf/entry.py"], tmp_path, exclude=frozenset({"pgolf/room/a.py"})) == [
        "pgolf/__init__.py", "pgolf/deep/__init__.py", "pgolf/deep/er/__init__.py", "pgolf/deep/er/c.py",
        "pgolf/entry.py", "pgolf/room/__init__.py", "pgolf/room/b.py"]


def test_code_bytes_are_the_scripts_length_and_its_bundle_what_main_reaches(tmp_path):
    source = "def f(x):\n    return x + 1\n" * 200
    write(tmp_path, "pgolf/__init__.py", "")
    write(tmp_path, "pgolf/a.py", "from pgolf.b import f\ndef main(params, script):\n    return f(1)\n")
    write(tmp_path, "pgolf/b.py", source + "def unused():\n    return 0\n")
    write(tmp_path, "pgolf/c.py", source)
    params = {"train": {"seed": 7}}
    for compressor in ("brotli", "lrzip", None):
        script = script_text(["pgolf/a.py"], params, compressor, tmp_path)
        assert code_bytes(["pgolf/a.py"], params, compressor, tmp_path) == len(script.encode())
        assert read_bundle(script) == {"params": params, "files": {
            "pgolf/__init__.py": "", "pgolf/a.py": minified_source((tmp_path / "pgolf/a.py").read_text(), "a.py"),
            "pgolf/b.py": minified_source(source, "b.py")}}
    plain = code_bytes(["pgolf/a.py"], params, None, tmp_path)
    assert code_bytes(["pgolf/a.py"], params, "brotli", tmp_path) < plain // 3  # one compressed stream


def test_a_missing_entry_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pgolf/nope.py"):
        code_bytes(["pgolf/nope.py"], {}, root=tmp_path)


@pytest.mark.parametrize("compressor", ["brotli", "lrzip"])
def test_the_script_runs_its_entry_and_refuses_an_uncounted_project_module(tmp_path, compressor):
    """A bundled module that imports a project file the closure missed fails, never loads it from elsewhere."""
    write(tmp_path, "pgolf/__init__.py", "")
    write(tmp_path, "pgolf/entry.py", "import importlib\nfrom pgolf.util import twice\n"
          "def main(params, script):\n    print(twice(params['x']))\n"
          "    importlib.import_module(params['module'])\n    return 0\n")
    write(tmp_path, "pgolf/util.py", "def twice(x):\n    return 2 * x\n")
    write(tmp_path, "pgolf/hidden.py", "")  # imported by name at run time: not in the closure
    for module, expected in (("json", 0), ("pgolf.hidden", 1)):
        script = tmp_path / "run" / "train_gpt.py"
        script.parent.mkdir(exist_ok=True)
        script.write_text(script_text(["pgolf/entry.py"], {"x": 21, "module": module}, compressor, tmp_path))
        result = subprocess.run([sys.executable, "train_gpt.py"], cwd=script.parent, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(tmp_path)})  # an importable pgolf beside it
        assert result.returncode == expected and result.stdout.startswith("42"), result.stderr
    assert "pgolf.hidden is not in this submission" in result.stderr


def test_an_lrzip_coded_script_without_the_program_stops_with_one_line_naming_it(tmp_path):
    write(tmp_path, "pgolf/__init__.py", "")
    write(tmp_path, "pgolf/entry.py", "def main(params, script):\n    return 0\n")
    script = tmp_path / "train_gpt.py"
    script.write_text(script_text(["pgolf/entry.py"], {}, "lrzip", tmp_path))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": str(tmp_path)})  # no lrzip on the path
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "lrzip-coded" in result.stderr
    assert "apt-get install lrzip" in result.stderr


@pytest.mark.parametrize("size", [0, 1, 30, 31, 32, 61, 62, 63, 1000])
def test_base_93_text_decodes_to_its_bytes_in_the_script_as_in_the_bundler(size):
    """The script's own decoder (``B93_DECODER``, run here as the script runs it) and ``b93decode`` both give back
    what ``b93encode`` wrote: random bytes, and the zero and 0xff runs at a block's edges."""
    script_decoder: dict = {}
    exec(compile(B93_DECODER, "train_gpt.py", "exec"), script_decoder)
    for data in (torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size)).to(torch.uint8)
                 .numpy().tobytes(), bytes(size), b"\xff" * size):
        text = b93encode(data)
        assert set(text) <= set(B93_ALPHABET) and '"' not in text and "\\" not in text
        assert len(text) == 1 + 38 * math.ceil(size / 31)
        assert b93decode(text) == data and script_decoder["E"](text) == data


@pytest.mark.parametrize("text", ["", "!" * 38, "~" + "!" * 38, "!" + "~" * 38, '!' + '"' * 38])
def test_text_base_93_cannot_have_written_is_a_value_error(text):
    with pytest.raises(ValueError, match="base 93"):
        b93decode(text)


def test_the_modules_text_reads_back_and_refuses_a_source_that_holds_its_separator():
    files = {"pgolf/__init__.py": "", "pgolf/a.py": 'x = "\\x1e"\ny = {"k": [1]}\n'}  # the escape, not the character
    assert read_modules(modules_text(files)) == files and read_modules("") == {}
    with pytest.raises(ValueError, match="pgolf/b.py: holds the bundle's separator"):
        modules_text({"pgolf/b.py": "x = '\x1f'\n"})
    for text in ("pgolf/a.py\x1fx = 1\n", "\x1epgolf/a.py"):
        with pytest.raises(ValueError, match="not the bundler's text"):
            read_modules(text)


def test_an_lrzip_coded_scripts_params_read_without_the_program_and_a_stream_without_its_header_is_named(
        tmp_path, monkeypatch):
    write(tmp_path, "pgolf/__init__.py", "")
    write(tmp_path, "pgolf/entry.py", "def main(params, script):\n    return 0\n")
    script = script_text(["pgolf/entry.py"], {"train": {"seed": 7}}, "lrzip", tmp_path)
    assert read_bundle(script)["params"] == {"train": {"seed": 7}}
    monkeypatch.setenv("PATH", str(tmp_path))  # no lrzip: the params never need it
    assert read_params(script) == {"train": {"seed": 7}}
    stream = script.split('D("')[1].split('")')[0]
    corrupt = script.replace(stream, b93encode(b"not an lrzip stream at all"))
    with pytest.raises(ValueError, match="not an lrzip stream"):
        read_bundle(corrupt)


def test_the_shipped_code_is_what_the_runner_runs_on_the_record():
    """Training, quantization, compression and evaluation ship; no stage, no bundler, no option the record leaves
    off."""
    shipped = set(shipped_files(["pgolf/submit/runner.py"], baked("record")))
    assert {"pgolf/train/loop.py", "pgolf/quant/gptq.py", "pgolf/artifact/compress.py", "pgolf/eval/score.py",
            "pgolf/quant/calibrate.py"} <= shipped <= set(import_closure(["pgolf/submit/runner.py"]))
    assert not any(name.startswith(("stages/", "pgolf/pipeline/")) for name in shipped)
    assert not shipped & {"pgolf/submit/bundle.py", "pgolf/submit/shake.py", "pgolf/submit/export.py",
                          "pgolf/artifact/ans.py", "pgolf/artifact/pergroup.py", "pgolf/eval/ttt.py",
                          "pgolf/eval/lora.py", "pgolf/quant/allocate.py", "pgolf/quant/lqer.py",
                          "pgolf/quant/search.py"}


def test_the_gate_names_size_limit_and_overshoot():
    check_size(900, 100, 1000)  # exactly at the limit fits
    with pytest.raises(SizeLimitError, match=r"900 artifact \+ 101 code = 1,001 bytes, over the limit of 1,000 by 1"):
        check_size(900, 101, 1000)


def test_shipped_code_is_minified_but_runs_the_same():
    source = ('"""Module doc."""\nfrom __future__ import annotations\nimport math\n'
              'from dataclasses import dataclass\n\n\ndef area(radius: float) -> float:\n    """Doc."""\n'
              '    # why: a comment\n    squared_radius = radius ** 2\n'
              '    return math.pi * squared_radius\n\n\nclass Empty:\n    """Only a docstring."""\n\n\n'
              '@dataclass\nclass Point:\n    x: float = 0.0\n')
    shipped = minified_source(source, "m.py")
    assert "doc" not in shipped.lower() and "comment" not in shipped and "squared_radius" not in shipped
    assert "x:float=" in shipped and len(shipped) < 0.6 * len(source)  # a dataclass field keeps its annotation
    scope: dict = {}
    exec(compile(shipped, "m.py", "exec"), scope)
    assert scope["area"](radius=2.0) == math.pi * 4 and isinstance(scope["Empty"](), scope["Empty"])
    assert scope["Point"](x=1.5).x == 1.5


def preset_configs(preset: str, *overrides: str) -> RunConfigs:
    """The sections the script of ``presets/<preset>.yaml`` bakes, with ``section.key=value`` overrides."""
    return run_configs(load_params(REPO_ROOT / "presets" / f"{preset}.yaml", list(overrides)))


def baked(preset: str, *overrides: str) -> dict:
    """Every output key the script of ``presets/<preset>.yaml`` bakes, with ``section.key=value`` overrides."""
    return preset_configs(preset, *overrides).baked()


RECORD_CODE_BYTES = 53_000  # the record preset's script today (docs/SUBMISSION.md, "Code bytes"), as a ceiling


def test_the_record_presets_script_stays_within_its_code_bytes():
    """A module that starts to reach pipeline code from the runner shows here: ``python -m stages.bundle --params
    presets/record.yaml --out DIR --modules`` prints what each module weighs."""
    assert code_bytes(["pgolf/submit/runner.py"], baked("record")) <= RECORD_CODE_BYTES


def test_the_micro_preset_ships_the_records_code():
    """The export tests run the micro preset's script: it carries exactly the record's modules and code."""
    record, micro = (shipped_files(["pgolf/submit/runner.py"], baked(preset)) for preset in ("record", "micro"))
    assert record == micro


# Run in a fresh interpreter: the script's bundle, then the runner's sections from its baked params.
SECTIONS_RUN = """
import json, sys
script = sys.argv[1]
namespace = {"__name__": "bundle_check"}
exec(compile(open(script, encoding="utf-8").read(), script, "exec"), namespace)  # installs the bundle's importer
from pgolf.submit.sections import RunConfigs
print(json.dumps(RunConfigs.from_baked(namespace["P"]).baked()))
"""


def test_a_script_baking_only_the_changed_params_runs_the_same_sections_for_fewer_bytes(tmp_path):
    """``compress.bake_params: changed``: the record preset's values are nearly all the code's defaults, so its
    script carries a few keys, and the runner, from the bundle alone, fills in the rest as the pipeline has them."""
    configs = preset_configs("record", "compress.bake_params=changed")
    changed = script_params(configs)
    assert sum(map(len, changed.values())) < 5  # the record preset is the defaults, but for a few keys
    script = tmp_path / "train_gpt.py"
    script.write_text(script_text(["pgolf/submit/runner.py"], changed))
    assert len(script.read_bytes()) <= code_bytes(["pgolf/submit/runner.py"], configs.baked()) - 2_500
    result = subprocess.run([sys.executable, "-c", SECTIONS_RUN, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == json.loads(script_json(configs.baked()))


COMPRESSORS = {"brotli": set(), "lzma": set(), "zstd": set(), "ans": {"pgolf/artifact/ans.py"},
               "pergroup": {"pgolf/artifact/pergroup.py"}}
TTT = {False: set(), True: {"pgolf/eval/ttt.py", "pgolf/eval/lora.py"}}
RATE_AWARE = {"pgolf/quant/rate.py", "pgolf/artifact/ans.py"}  # rate-aware GPTQ prices codes by the ans coder's model
SENSITIVITY = ["calibrate.output_sensitivity=true"]  # calibrate collects it, the quantizer weighs rows by it
FEW_CANDIDATES = ["quantize.allocate_bits=[5,6]", "quantize.allocate_clip_sigmas=[12.85]"]  # a quick allocation
QUANTIZERS = {  # record overrides -> the option modules they add
    "rate_lambda": (["quantize.rate_lambda=0.05"], RATE_AWARE),
    "fit_to_size": (["quantize.fit_to_size=true"], {"pgolf/quant/search.py"}),
    "fit_rate_lambda": (["quantize.fit_to_size=true", "quantize.fit_knob=rate_lambda"],
                        {"pgolf/quant/search.py"} | RATE_AWARE),
    "lqer": (["quantize.lqer_rank=2"], {"pgolf/quant/lqer.py"}),
    "allocate": (["quantize.method=allocate", *FEW_CANDIDATES], {"pgolf/quant/allocate.py", "pgolf/quant/lqer.py"}),
    "allocate_rates": (["quantize.method=allocate", *FEW_CANDIDATES, "quantize.allocate_rate_lambdas=[0.0,0.05]"],
                       {"pgolf/quant/allocate.py", "pgolf/quant/lqer.py"} | RATE_AWARE),
    "lrzip_coded_script": (["compress.code_compressor=lrzip"], set()),  # the script's own stream, no option module
    "loss_sdclip": ([*SENSITIVITY, "quantize.scale_search=loss_sdclip"], {"pgolf/quant/sensitivity.py"}),
    "allocate_loss": (["quantize.method=allocate", *FEW_CANDIDATES, *SENSITIVITY, "quantize.allocate_distortion=loss"],
                      {"pgolf/quant/allocate.py", "pgolf/quant/lqer.py", "pgolf/quant/sensitivity.py"}),
    "row_percentiles": (["quantize.scale_search=row_percentiles"], {"pgolf/quant/percentiles.py"}),  # PR #576
    "matrix_percentiles": (["quantize.scale_search=matrix_percentiles"], {"pgolf/quant/percentiles.py"}),  # PR #1218
    "table_rounding": (["quantize.table_clip_quantile=0.9999"], {"pgolf/quant/percentiles.py"}),
}
OPTION_FILES = set().union(*COMPRESSORS.values(), *TTT.values(), *(files for _, files in QUANTIZERS.values()))


def option_cases() -> list[tuple[str, list[str], set[str]]]:
    """(name, record overrides, option modules its script must ship): each compressor with TTT off and on, and each
    quantizer option that needs a module."""
    cases = [(f"{name}-ttt_{on}".lower(), [f"compress.compressor={name}", f"ttt.enabled={str(on).lower()}"],
              files | TTT[on]) for name, files in COMPRESSORS.items() for on in TTT]
    return cases + [(name, overrides, files) for name, (overrides, files) in QUANTIZERS.items()]


@pytest.mark.parametrize(("overrides", "expected"), [case[1:] for case in option_cases()],
                         ids=[case[0] for case in option_cases()])
def test_a_script_ships_an_option_module_exactly_when_its_params_switch_it_on(overrides, expected):
    shipped = set(shipped_files(["pgolf/submit/runner.py"], baked("record", *overrides)))
    assert shipped & OPTION_FILES == expected


LOADER_FILES = {"shuffled": set(), "sequential": {"pgolf/data/sequential.py"}, "coprime": {"pgolf/data/coprime.py"},
                "packed": {"pgolf/data/packed.py"}}  # train.loader -> the variant module its script ships
LOADER_RUN = """
import json, sys
script, kind, shard = sys.argv[1:]
exec(compile(open(script, encoding="utf-8").read(), script, "exec"), {"__name__": "bundle_check"})
from pgolf.data.loader import make_loader
inputs = make_loader(kind, [shard], 16, 0, 64, 1).micro_batches(3)[0][0]  # step 3, the first micro-batch
print(json.dumps(inputs.flatten().tolist()))
"""


@pytest.mark.parametrize("kind", LOADER_FILES)
def test_a_script_ships_the_loader_its_params_choose_and_reads_the_librarys_batches_with_it(tmp_path, kind):
    params = baked("record", f"train.loader={kind}")
    shipped = set(shipped_files(["pgolf/submit/runner.py"], params))
    assert shipped & set().union(*LOADER_FILES.values()) == LOADER_FILES[kind]
    script, shard = tmp_path / "train_gpt.py", tmp_path / "fineweb_train_000000.bin"
    script.write_text(script_text(["pgolf/submit/runner.py"], params, compressor=None))
    tokens = torch.randint(BOS_ID + 1, 1024, (6_000,), generator=torch.Generator().manual_seed(0))
    tokens[::97] = BOS_ID  # documents, for the packed loader
    write_shard(shard, tokens)
    result = subprocess.run([sys.executable, "-c", LOADER_RUN, str(script), kind, str(shard)], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    expected = make_loader(kind, [shard], 16, 0, 64, 1).micro_batches(3)[0][0]
    assert json.loads(result.stdout) == expected.flatten().tolist()


# Run in a fresh interpreter: the exported script's bundle (its importer first, so the project's own modules are out
# of reach), then the runner's make_artifact on a saved model and the decompression of its artifact.
BUNDLE_RUN = """
import sys, torch
script, model_file, hessians_file, sensitivity_file, artifact_file, code = sys.argv[1:]
namespace = {"__name__": "bundle_check"}
exec(compile(open(script, encoding="utf-8").read(), script, "exec"), namespace)  # installs the bundle's importer
from pgolf.artifact.load import artifact_model
from pgolf.clocks import Clocks
from pgolf.submit.runner import make_artifact
from pgolf.submit.sections import RunConfigs
cfgs = RunConfigs.from_baked(namespace["P"])
hessians, sensitivity = (torch.load(path, weights_only=True) for path in (hessians_file, sensitivity_file))
make_artifact(cfgs, __import__("pathlib").Path(model_file), hessians, sensitivity,
              __import__("pathlib").Path(artifact_file), int(code), Clocks())
artifact_model(artifact_file, torch.device("cpu"))
try:
    import pgolf.eval.ttt
    print("ttt shipped")
except ImportError as exc:
    print(exc)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "expected"), [case[1:] for case in option_cases()],
                         ids=[case[0] for case in option_cases()])
def test_each_options_script_makes_the_pipelines_artifact_with_only_its_shipped_code(tmp_path, overrides, expected):
    """The runner's quantize-compress-decompress path, run from the shaken, minified bundle alone, gives the artifact
    the library gives in this process; TTT imports from the bundle exactly when it is on."""
    params = baked("record", "quantize.passthrough_max_numel=0", "quantize.fit_margin_bytes=1500", *overrides)
    model, hessians = model_with_hessians()
    save_model(tmp_path / "model.pt", model.config, model.state_dict())
    torch.save(hessians, tmp_path / "hessians.pt")
    batches = [torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sensitivity = (collect_output_sensitivity(model, batches, "cpu", show_progress=False)
                   if RunConfigs.from_baked(params).quantize.uses_output_sensitivity else None)
    torch.save(sensitivity, tmp_path / "sensitivity.pt")
    limit = 4_000_000
    params["compress"]["size_limit_bytes"] = limit
    script = tmp_path / "train_gpt.py"
    compressor = RunConfigs.from_baked(params).compress.script_compressor
    script.write_text(script_text(["pgolf/submit/runner.py"], params, compressor))
    result = subprocess.run([sys.executable, "-c", BUNDLE_RUN, str(script), str(tmp_path / "model.pt"),
                             str(tmp_path / "hessians.pt"), str(tmp_path / "sensitivity.pt"),
                             str(tmp_path / "bundled.ptz"), "5000"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    make_artifact(RunConfigs.from_baked(params), tmp_path / "model.pt", hessians, sensitivity, tmp_path / "library.ptz",
                  5000, Clocks(log=lambda line: None))
    assert (tmp_path / "bundled.ptz").read_bytes() == (tmp_path / "library.ptz").read_bytes()
    ttt_line = result.stdout.strip().splitlines()[-1]
    assert ttt_line == ("ttt shipped" if "pgolf/eval/ttt.py" in expected
                        else "pgolf.eval.ttt is not in this submission")
