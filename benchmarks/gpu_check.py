"""One command for a CUDA machine: the GPU tests, flash against SDPA, the record's tokens/s, a short record run.

Runs, in order, and writes what each found to ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``
(every subprocess's output goes to ``OUT/gpu_check.log``)::

    python -m benchmarks.gpu_check --fineweb ../shared/fineweb --out gpu_report [--train-seconds 120]

1. ``tests``: ``pytest -m gpu`` (compiled training and evaluation against eager on CUDA) and
   the flash-against-SDPA test of ``tests/model/test_gpt.py``;
2. ``attention``: the flash kernel pgolf would use against PyTorch's SDPA on the record's
   attention shapes in bf16: largest difference, forward + backward milliseconds of each;
3. ``throughput``: ``benchmarks.bench_train`` on the record config (compile on, bf16) on one
   GPU, looping off and on: tokens/s against the record's 0.97 M per H100 (7.73 M on 8, looping off);
4. ``frontier``: the same on ``presets/frontier.yaml`` (PR #1855: packed 98,304-token rows with
   segment attention, FlashAttention-3 varlen when installed, else flex attention): tokens/s against
   its 8.2 M on 8×H100 before looping and 5.6 M after (1.03 M and 0.70 M per H100);
5. ``pipeline``: the record config trained for ``--train-seconds`` on the FineWeb sample in
   ``--fineweb`` (its ``fineweb10B_sp8192/`` shards and the sp8192 tokenizer), then prequant,
   calibrate, bundle, quantize, compress and evaluate, each by ``python -m pgolf.cli`` in a scratch
   directory.
   The sample is 247 k training tokens: the run shows speed and that every stage runs on the
   GPU, not a score (the model overfits the sample).

Without a CUDA device it prints ``no CUDA device: skipping GPU checks``, writes the report
with every check skipped, and exits 0. ``--device cpu`` instead rehearses the throughput and
pipeline checks on the CPU (pass a small ``--params``), to try this script without a GPU.
The exit status is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from pgolf.config import TrainConfig, load_params, section
from pgolf.pipeline import layout

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("tests", "attention", "throughput", "frontier", "pipeline")
GPU_ONLY = ("tests", "attention")
# (name, pgolf command): the stages of dvc.yaml in its order; prequant scores the trained weights
STAGES = (("tokenize", ["tokenize"]), ("train", ["train"]), ("prequant", ["prequant"]),
          ("calibrate", ["calibrate"]), ("bundle", ["bundle"]), ("quantize", ["quantize"]), ("compress", ["compress"]),
          ("evaluate", ["evaluate"]))
METRICS = {"train": layout.TRAIN_METRICS, "prequant": layout.PREQUANT_METRICS, "compress": layout.COMPRESS_METRICS,
           "evaluate": layout.EVALUATE_METRICS}
RUNTIME_IMPORTS = ("brotli", "sentencepiece", "yaml", "tqdm", "matplotlib", "google.protobuf", "pytest")
RECORD_TOKENS_PER_S_PER_H100 = 0.97e6  # 7.73 M tokens/s on 8xH100 (docs/DESIGN.md §3)
# PR #1855, seed 42 (its train log): 8.2 M tokens/s on 8xH100 before looping, 5.6 M after
FRONTIER_TOKENS_PER_S_PER_H100 = {"looping_off": 8.2e6 / 8, "looping_on": 5.6e6 / 8}
FRONTIER_PARAMS = REPO_ROOT / "presets" / "frontier.yaml"
NO_CUDA = "no CUDA device: skipping GPU checks"


class CheckFailed(Exception):
    """A check ran but did not pass; the message says what went wrong."""


@dataclass
class CheckResult:
    name: str
    status: str  # passed | failed | skipped
    seconds: float = 0.0
    detail: str = ""  # why skipped or failed, or a one-line summary
    figures: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    fineweb: Path
    tokenizer: Path
    out: Path
    device: str
    params: Path
    overrides: tuple[str, ...]
    frontier_params: Path
    frontier_overrides: tuple[str, ...]
    train_seconds: float
    bench_steps: int
    bench_warmup_steps: int
    keep_work_dir: bool


# ---------------------------------------------------------------- subprocesses


def run_logged(command: list[str], log: Path, cwd: Path = REPO_ROOT) -> str:
    """Run ``command`` with this checkout importable, its output (stdout and stderr) going into ``log``
    as it runs, so a check stopped from outside (a device's time limit) leaves what it got to; its output.

    A non-zero exit is a CheckFailed naming the command and quoting its last lines.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    with log.open("ab") as f:
        f.write(f"\n$ (cd {cwd} && {' '.join(command)})\n".encode())
        f.flush()
        first = f.tell()
        proc = subprocess.run(command, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        f.write(f"# exit {proc.returncode}, {time.perf_counter() - started:.1f} s\n".encode())
    with log.open("rb") as f:
        f.seek(first)
        output = f.read().decode("utf-8", errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-6:-1])
        raise CheckFailed(f"`{' '.join(command[1:4])} ...` exited {proc.returncode}: {tail}")
    return output


def last_json_object(text: str) -> dict:
    """The JSON object a benchmark prints last (indented, from a line holding only '{'); text after it is ignored."""
    start = text.rfind("\n{")
    start = 0 if start < 0 and text.startswith("{") else start
    if start < 0:
        raise CheckFailed(f"no JSON report in the output: {text[-300:]!r}")
    return json.JSONDecoder().raw_decode(text[start:].lstrip())[0]


def pytest_summary(output: str) -> str:
    lines = [line.strip("= ") for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped)", line)]
    return lines[-1] if lines else "no summary line"


# ---------------------------------------------------------------- the checks


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def require_dependencies() -> None:
    """pgolf's runtime imports beyond torch and numpy (the test modules import them all)."""
    missing = [name for name in RUNTIME_IMPORTS if not importable(name)]
    if missing:
        raise CheckFailed(f"pgolf needs {', '.join(missing)}: pip install -e . (or carry the wheels)")


def check_tests(opts: Options, log: Path) -> dict:
    """The tests marked gpu, and the flash-against-SDPA test (by name: it carries no marker)."""
    require_dependencies()
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    marked = pytest_summary(run_logged(pytest + ["-m", "gpu", "tests"], log))
    attention = pytest_summary(run_logged(pytest + ["tests/model/test_gpt.py::test_gpu_attention_matches_sdpa"], log))
    if "skipped" in marked or "skipped" in attention:
        raise CheckFailed(f"GPU tests skipped on a GPU: {marked}; {attention}")
    return {"pytest -m gpu": marked, "test_gpu_attention_matches_sdpa": attention}


def flash_kernel_name() -> str | None:
    """Which flash kernel pgolf.model.gpt imported (the same lookup order), or None."""
    if importlib.util.find_spec("flash_attn_interface") is not None:
        return "FlashAttention-3 (flash_attn_interface)"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash-attn 2"
    return None


def time_fwd_bwd(attention: Callable, q, k, v, repeats: int = 20) -> float:
    """Median milliseconds of one forward + backward of ``attention`` (CUDA events)."""
    times = []
    for index in range(repeats + 3):  # the first calls pick kernels
        q.grad = k.grad = v.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        attention(q, k, v).sum().backward()
        end.record()
        torch.cuda.synchronize()
        if index >= 3:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def check_attention(opts: Options, log: Path) -> dict:
    """pgolf's flash path against SDPA on the record's shapes: 48 x 2048 tokens, 8 heads / 4 KV heads of 64."""
    from pgolf.model.gpt import FLASH_ATTENTION, sdpa_attention

    torch.manual_seed(0)
    shapes = {"q": (48, 2048, 8, 64), "k": (48, 2048, 4, 64), "v": (48, 2048, 4, 64)}  # [B, T, H, D]
    q, k, v = (torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s in shapes.values())
    figures = {"shapes": shapes, "sdpa_fwd_bwd_ms": round(time_fwd_bwd(sdpa_attention, q, k, v), 3)}
    kernel = flash_kernel_name()
    if FLASH_ATTENTION is None:
        figures["flash"] = "not installed: the model runs SDPA (pip install -e '.[gpu]' or FlashAttention-3)"
        return figures
    with torch.no_grad():
        reference = sdpa_attention(q, k, v)  # [B, T, H, D]
        difference = (FLASH_ATTENTION(q, k, v).float() - reference.float()).abs().max().item()
    figures |= {"flash": kernel, "max_abs_difference": difference,
                "flash_fwd_bwd_ms": round(time_fwd_bwd(FLASH_ATTENTION, q, k, v), 3)}
    if difference > 2e-2:  # bf16 outputs of unit scale: the tolerance of tests/model/test_gpt.py
        raise CheckFailed(f"{kernel} differs from SDPA by {difference:.3e} (limit 2e-2)")
    return figures


def looping_runs(params: Path, overrides: tuple[str, ...], opts: Options, log: Path) -> dict:
    """benchmarks.bench_train on ``params``, looping off throughout and then on throughout (compile auto)."""
    command = [sys.executable, "-m", "benchmarks.bench_train", "--params", str(params), "--device", opts.device,
               "--steps", str(opts.bench_steps), "--warmup-steps", str(opts.bench_warmup_steps),
               "--set", "train.compile=auto"]
    for override in overrides:
        command += ["--set", override]
    # enable_looping_at is a training fraction: 1.0 is never reached before the end, 0.0 at once
    return {phase: last_json_object(run_logged(command + ["--set", f"train.enable_looping_at={at}"], log))
            for phase, at in (("looping_off", 1.0), ("looping_on", 0.0))}


def check_throughput(opts: Options, log: Path) -> dict:
    """The record's config (``--params``) on one device.

    Compile auto: on, with bf16, on the GPU (off on a CPU rehearsal). The record's 7.73 M
    tokens/s on 8 GPUs is its rate before looping switches on (steps 500 to 1500 of its logs).
    """
    runs = looping_runs(opts.params, opts.overrides, opts, log)
    off = runs["looping_off"]["tokens_per_s"]
    return runs | {"record_anchor_tokens_per_s_per_h100": RECORD_TOKENS_PER_S_PER_H100,
                   "looping_off_fraction_of_record_anchor": round(off / RECORD_TOKENS_PER_S_PER_H100, 3)}


def check_frontier(opts: Options, log: Path) -> dict:
    """presets/frontier.yaml on one device (``--frontier-set`` overrides it), against PR #1855's logged rates."""
    from pgolf.model.gpt import FLASH_VARLEN

    runs = looping_runs(opts.frontier_params, opts.frontier_overrides, opts, log)
    fractions = {phase: round(runs[phase]["tokens_per_s"] / anchor, 3)
                 for phase, anchor in FRONTIER_TOKENS_PER_S_PER_H100.items()}
    attention = "masked SDPA (CPU)" if opts.device == "cpu" else \
        "FlashAttention-3 varlen" if FLASH_VARLEN is not None else "flex attention"
    return runs | {"attention": attention,
                   "frontier_anchor_tokens_per_s_per_h100": FRONTIER_TOKENS_PER_S_PER_H100,
                   "fraction_of_frontier_anchor": fractions}


def pipeline_params(opts: Options) -> dict:
    """``--params`` on the FineWeb sample, on this one device, training for ``--train-seconds``."""
    shards = opts.fineweb / "fineweb10B_sp8192"
    for path in (shards, opts.tokenizer):
        if not path.exists():
            raise CheckFailed(f"{path} not found (--fineweb DIR must hold fineweb10B_sp8192/; --tokenizer FILE)")
    params = load_params(opts.params, list(opts.overrides))
    reserve = section(params, "train", TrainConfig).gptq_reserve_seconds
    overrides = {
        "tokenize": {"docs_path": "", "shards_path": str(shards.resolve()),
                     "tokenizer_path": str(opts.tokenizer.resolve())},
        "train": {"max_wallclock_seconds": opts.train_seconds + reserve, "nproc_per_node": 1, "device": opts.device,
                  "checkpoint_every": 0},
        "calibrate": {"device": opts.device},
        "quantize": {"device": opts.device},
        "evaluate": {"nproc_per_node": 1, "device": opts.device},
    }
    for name, values in overrides.items():
        params.setdefault(name, {}).update(values)
    return params


def check_pipeline(opts: Options, log: Path) -> dict:
    """Every stage in a scratch directory, then the figures of their metrics files."""
    require_dependencies()  # now, not in the compress stage after minutes of training
    work = Path(tempfile.mkdtemp(prefix="pgolf-gpu-check-"))
    try:
        params_file = work / "params.yaml"
        params_file.write_text(yaml.safe_dump(dict(pipeline_params(opts)), sort_keys=False), encoding="utf-8")
        runs = work / layout.HAND_RUNS_DIR  # where `pgolf STAGE` writes outside DVC
        stage_seconds = {}
        for stage, command in STAGES:
            started = time.perf_counter()
            run_logged([sys.executable, "-m", "pgolf.cli", *command, "--params", str(params_file), "--out", str(runs)],
                       log, cwd=work)
            stage_seconds[stage] = round(time.perf_counter() - started, 1)
        metrics = {stage: json.loads((runs / path).read_text(encoding="utf-8")) for stage, path in METRICS.items()}
        return {"stage_seconds": stage_seconds, "metrics": metrics}
    finally:
        if opts.keep_work_dir:
            print(f"[gpu_check] pipeline outputs kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


CHECK_FUNCTIONS: dict[str, Callable[[Options, Path], dict]] = {
    "tests": check_tests, "attention": check_attention, "throughput": check_throughput, "frontier": check_frontier,
    "pipeline": check_pipeline,
}


def run_check(name: str, opts: Options, log: Path) -> CheckResult:
    print(f"[gpu_check] {name} ...", flush=True)
    started = time.perf_counter()
    try:
        figures = CHECK_FUNCTIONS[name](opts, log)
        result = CheckResult(name, "passed", figures=figures)
    except (CheckFailed, ValueError, RuntimeError, OSError) as exc:  # ValueError: a bad --params or --set
        result = CheckResult(name, "failed", detail=str(exc))
    result.seconds = round(time.perf_counter() - started, 1)
    print(f"[gpu_check] {name}: {result.status} ({result.seconds} s) {result.detail}", flush=True)
    return result


# ---------------------------------------------------------------- the report


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "device": device,
            "flash_kernel": flash_kernel_name(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_count": torch.cuda.device_count(),
                 "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return info


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def headline(result: CheckResult) -> str:
    """The figures of one check in one Markdown cell."""
    f = result.figures
    if result.name == "tests":
        return "; ".join(f"{k}: {v}" for k, v in f.items())
    if result.name == "attention":
        flash = f.get("flash_fwd_bwd_ms")
        return (f"SDPA {f['sdpa_fwd_bwd_ms']} ms fwd+bwd; " + (f"{f['flash']} {flash} ms, max difference "
                f"{f['max_abs_difference']:.2e}" if flash is not None else f["flash"]))
    if result.name == "throughput":
        off, on = f["looping_off"], f["looping_on"]
        return (f"looping off {off['tokens_per_s']:,.0f} tokens/s ({off['step_ms']} ms per "
                f"{off['tokens_per_step']:,}-token step, {f['looping_off_fraction_of_record_anchor']:.2f} of the "
                f"record's 0.97 M per H100), looping on {on['tokens_per_s']:,.0f} tokens/s; {off['device']}")
    if result.name == "frontier":
        off, on, share = f["looping_off"], f["looping_on"], f["fraction_of_frontier_anchor"]
        return (f"{f['attention']}: looping off {off['tokens_per_s']:,.0f} tokens/s ({share['looping_off']:.2f} of "
                f"PR #1855's 1.03 M per H100), looping on {on['tokens_per_s']:,.0f} ({share['looping_on']:.2f} of "
                f"0.70 M); {off['step_ms']} / {on['step_ms']} ms per {off['tokens_per_step']:,}-token step")
    if result.name == "pipeline":
        m = f["metrics"]
        prequant = m["prequant"].get("unquantized", {}).get("sliding_val_bpb")
        quantized = m["evaluate"].get("quantized", {}).get("sliding_val_bpb")
        return (f"train {m['train']['steps']} steps, {m['train']['tokens_per_s']:,.0f} tokens/s, loss "
                f"{m['train']['train_loss']:.4f}; submission {m['compress']['total_bytes']:,} bytes; sliding bpb "
                f"{rounded(prequant)} trained, {rounded(quantized)} quantized; stages (s): "
                + ", ".join(f"{k} {v}" for k, v in f["stage_seconds"].items()))
    return ""


def write_report(out: Path, env: dict, results: list[CheckResult]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "checks": [asdict(r) for r in results],
              "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [f"# gpu_check, {report['time_utc']} UTC", "",
             f"{env.get('gpu', 'no GPU')}, torch {env['torch']}, flash kernel: {env['flash_kernel'] or 'none'}", "",
             "| check | status | seconds | figures |", "| --- | --- | --- | --- |"]
    for r in results:
        cell = headline(r) if r.status == "passed" else r.detail
        lines.append(f"| {r.name} | {r.status} | {r.seconds} | {cell.replace('|', '/').replace(chr(10), ' ')} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"[gpu_check] report in {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)


def parse_options(argv: list[str] | None = None) -> tuple[Options, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fineweb", type=Path, required=True,
                        help="a FineWeb sample folder holding fineweb10B_sp8192/ (e.g. ../shared/fineweb)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="the sp8192 tokenizer (default: FINEWEB/../tokenizers/fineweb_8192_bpe.model)")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, .md and .log")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default); cpu rehearses the throughput and pipeline checks")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "presets" / "record.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--frontier-params", type=Path, default=FRONTIER_PARAMS,
                        help="the frontier check's params (default: presets/frontier.yaml)")
    parser.add_argument("--frontier-set", dest="frontier_overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--train-seconds", type=float, default=120.0, help="the pipeline's training budget")
    parser.add_argument("--bench-steps", type=int, default=20, help="timed throughput steps (looping on half-way)")
    parser.add_argument("--bench-warmup-steps", type=int, default=3, help="compile warm-up steps per looping phase")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the pipeline's scratch directory")
    args = parser.parse_args(argv)
    requested = {c for c in args.checks.split(",") if c}
    unknown = sorted(requested - set(CHECKS))
    if unknown:
        parser.error(f"--checks: unknown {', '.join(unknown)} (known: {', '.join(CHECKS)})")
    checks = [c for c in CHECKS if c in requested]
    tokenizer = args.tokenizer or args.fineweb / ".." / "tokenizers" / "fineweb_8192_bpe.model"
    opts = Options(fineweb=args.fineweb, tokenizer=tokenizer, out=args.out, device=args.device,
                   params=args.params.resolve(), overrides=tuple(args.overrides),
                   frontier_params=args.frontier_params.resolve(), frontier_overrides=tuple(args.frontier_overrides),
                   train_seconds=args.train_seconds,
                   bench_steps=args.bench_steps, bench_warmup_steps=args.bench_warmup_steps,
                   keep_work_dir=args.keep_work_dir)
    return opts, checks


def main(argv: list[str] | None = None) -> int:
    opts, checks = parse_options(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    log = opts.out / "gpu_check.log"
    log.write_text("", encoding="utf-8")
    env = environment(opts.device)
    results = []
    no_cuda = opts.device == "cuda" and not torch.cuda.is_available()
    if no_cuda:
        print(NO_CUDA, flush=True)
    for name in checks:
        if no_cuda:
            results.append(CheckResult(name, "skipped", detail="no CUDA device"))
        elif opts.device == "cpu" and name in GPU_ONLY:
            results.append(CheckResult(name, "skipped", detail="GPU only (--device cpu)"))
        else:
            results.append(run_check(name, opts, log))
    write_report(opts.out, env, results)
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
