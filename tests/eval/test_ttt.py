"""Score-first test-time training: legality (issue #1017's four conditions) and the variants' arithmetic.

Micro models on a synthetic stream of documents (BOS = 1) with random byte tables; every test
runs in seconds on one CPU core.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import pgolf.eval.ttt as ttt
from pgolf.config import ModelConfig, TTTConfig
from pgolf.data.accounting import lookup_stream
from pgolf.data.shards import BOS_ID
from pgolf.data.tokenizer import ByteTables, count_bytes
from pgolf.eval.bpb import NonFiniteScore, Window, eval_sliding, score_batch_tokens
from pgolf.model.gpt import GPT
from pgolf.pipeline import layout
from pgolf.pipeline.stage import Workspace
from tests.conftest import REPO_ROOT
from tests.stages.test_evaluate import BATCH, MAX_TOKENS, SEQ_LEN, STRIDE, VAL_TARGETS
from tests.stages.test_evaluate import workdir as stage_workdir  # noqa: F401 (a fixture: artifact + FineWeb val)
from tests.stages.test_plots import rendered

PIPELINE = Workspace.pipeline()  # the stages as DVC runs them

CPU = torch.device("cpu")
VOCAB = 64
MODEL = ModelConfig(vocab_size=VOCAB, num_layers=3, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=1,
                    rope_dims=8, rope_train_seq_len=32, xsa_last_n=3, num_loops=1, loop_start=1, loop_end=1)
# Small versions of each method's record settings: chunks of 128 targets, windows of 32 every 8.
BASE = TTTConfig(enabled=True, seq_len=32, stride=8, chunk_tokens=128, batch_seqs=3, score_batch_seqs=5,
                 lr=0.05, epochs=2, lora_rank=4, lora_lr=0.01, lora_chunk_tokens=8, lora_batch_docs=3,
                 phase_prefix_docs=6, phase_count=2, phase_chunk_tokens=64, phase_lr=0.01, last_n_blocks=1,
                 device="cpu", compile=False)
METHODS = {
    "sgd_all": BASE,
    "adamw_tail": dataclasses.replace(BASE, method="adamw_tail", lr=0.02),
    "lora_doc": dataclasses.replace(BASE, method="lora_doc"),
    "phased": dataclasses.replace(BASE, method="phased"),
}


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(MODEL)
    with torch.no_grad():  # the zero-initialised projections would leave most of the model inert
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.looping_active = True
    return model


def make_stream(num_docs: int = 14, seed: int = 0) -> torch.Tensor:
    """Documents ``[BOS] + ids`` of varied lengths; ids repeat a per-document motif so adapting helps."""
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(num_docs):
        length = int(torch.randint(10, 90, (1,), generator=generator))
        motif = torch.randint(2, VOCAB, (5,), generator=generator)
        docs.append(torch.cat([torch.tensor([BOS_ID]), motif.repeat(length // 5 + 1)[:length]]))
    return torch.cat(docs)


def make_tables() -> ByteTables:
    generator = torch.Generator().manual_seed(1)
    base = torch.randint(1, 4, (VOCAB,), generator=generator).to(torch.int16)
    space = torch.rand(VOCAB, generator=generator) < 0.4
    boundary = torch.zeros(VOCAB, dtype=torch.bool)
    base[:2], space[:2], boundary[:2] = 0, False, True  # pad and BOS carry no bytes
    return ByteTables(base, space, boundary)


TABLES = make_tables()


def run(cfg: TTTConfig, tokens: torch.Tensor, seed: int = 0) -> ttt.TTTResult:
    return ttt.run_ttt(make_model(seed), lookup_stream(tokens, TABLES), cfg, CPU, record_tokens=True)


def document_chunked_score(model: GPT, tokens: torch.Tensor, chunk: int, seq_len: int) -> tuple[float, float]:
    """Written out: each document scored in chunks of ``chunk`` predictions, context its own last ``seq_len``."""
    nll_sum = byte_sum = count = 0.0
    for doc in ttt.find_documents(tokens):
        predictions = doc.length - 1
        for first in range(0, predictions, chunk):
            end = min(first + chunk, predictions)
            lo = max(0, end - seq_len)
            inputs = tokens[doc.start + lo: doc.start + end][None]
            labels = tokens[doc.start + lo + 1: doc.start + end + 1][None]
            with torch.no_grad():
                logits = model.forward_logits(inputs)[0, first - lo:]
            nll_sum += F.cross_entropy(logits, labels[0, first - lo:], reduction="sum").item()
            byte_sum += count_bytes(inputs[0, first - lo:], labels[0, first - lo:], TABLES).sum().item()
            count += end - first
    loss = nll_sum / count
    return loss, loss / math.log(2.0) * count / byte_sum


# ------------------------------------------------------------------------------ zero learning rate


@pytest.mark.parametrize("method", ["sgd_all", "adamw_tail"])
def test_zero_lr_reproduces_the_sliding_score(method):
    tokens = make_stream()
    result = run(dataclasses.replace(METHODS[method], lr=0.0), tokens)
    expected = eval_sliding(make_model(), lookup_stream(tokens, TABLES), BASE.seq_len, BASE.stride, 7, CPU)
    assert result.optimizer_steps > 0  # the steps ran, at lr 0
    assert result.score.loss == pytest.approx(expected.loss, abs=1e-6)
    assert result.score.bpb == pytest.approx(expected.bpb, abs=1e-6)
    zero_epochs = run(dataclasses.replace(METHODS[method], epochs=0), tokens)
    assert zero_epochs.optimizer_steps == 0 and zero_epochs.score.bpb == pytest.approx(expected.bpb, abs=1e-6)


@pytest.mark.parametrize("method", ["lora_doc", "phased"])
def test_zero_lr_reproduces_the_document_chunked_base_score(method):
    tokens = make_stream()
    result = run(dataclasses.replace(METHODS[method], lora_lr=0.0, phase_lr=0.0), tokens)
    loss, bpb = document_chunked_score(make_model(), tokens, BASE.lora_chunk_tokens, BASE.seq_len)
    assert result.score.loss == pytest.approx(loss, abs=1e-6)
    assert result.score.bpb == pytest.approx(bpb, abs=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_lowers_the_loss_on_repetitive_documents(method):
    tokens = make_stream()
    adapted = run(METHODS[method], tokens)
    frozen = run(dataclasses.replace(METHODS[method], lr=0.0, lora_lr=0.0, phase_lr=0.0), tokens)
    assert adapted.score.bpb < frozen.score.bpb - 0.01


def test_the_compiled_scoring_pass_gives_the_eager_score_with_one_graph_per_batch_shape():
    """``ttt.compile``: each chunk's last, shorter batch is padded with windows that score nothing, so
    the chunks compile two graphs (the first window's batch, scoring from 0, and every other), not one
    per length of a last batch (five here before the padding; about half a minute each on a GPU)."""
    tokens = make_stream()
    eager = run(BASE, tokens)
    torch._dynamo.reset()  # no graph of an earlier test reused, no earlier recompiles counted against the limit
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = run(dataclasses.replace(BASE, compile=True), tokens)
    assert counters["stats"]["unique_graphs"] - graphs_before == 2
    assert compiled.score.loss == pytest.approx(eager.score.loss, rel=1e-6)
    assert compiled.score.bpb == pytest.approx(eager.score.bpb, rel=1e-6)


# ------------------------------------------------------------------------------ the four conditions


def changed_at(tokens: torch.Tensor, k: int) -> torch.Tensor:
    assert tokens[k] != BOS_ID and tokens[k - 1] != BOS_ID  # inside a document: the documents stay the same
    changed = tokens.clone()
    changed[k] = 2 + (int(tokens[k]) - 1) % (VOCAB - 2)
    return changed


K = 320  # in chunk 2 of style A (chunks of 128) and in chunk 2 of document 5 (chunks of 8, from 300)


@pytest.mark.parametrize("method", ["sgd_all", "adamw_tail", "lora_doc"])
def test_prefix_invariance(method):
    """Condition 1: changing the token at k leaves every loss of a target before k unchanged."""
    tokens = make_stream()
    before, after = run(METHODS[method], tokens).token_nll, run(METHODS[method], changed_at(tokens, K)).token_nll
    torch.testing.assert_close(after[: K - 1], before[: K - 1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[K - 1:], before[K - 1:])  # the change did reach the later losses
    if method == "lora_doc":  # documents are independent: only the changed one's later losses move
        document = next(d for d in ttt.find_documents(tokens) if d.start <= K < d.start + d.length)
        outside = torch.ones_like(before, dtype=torch.bool)
        outside[K - 1: document.start + document.length - 1] = False
        torch.testing.assert_close(after[outside], before[outside], rtol=0, atol=1e-6)


def test_phased_prefix_invariance_in_scoring_order():
    """phased (as the 04-22 record) trains the base on documents in scoring order, longest groups first:
    a change leaves every loss scored before it unchanged, but may move losses of documents that
    come earlier in the stream and are scored after a later phase."""
    tokens = make_stream()
    cfg = METHODS["phased"]
    before, after = run(cfg, tokens).token_nll, run(cfg, changed_at(tokens, K)).token_nll
    groups = ttt.document_groups(ttt.find_documents(tokens), cfg.lora_batch_docs)
    position = next(g for g, group in enumerate(groups) for d in group if d.start <= K < d.start + d.length)
    scored_before = torch.zeros_like(before, dtype=torch.bool)
    for group in groups[:position]:
        for doc in group:
            scored_before[doc.start: doc.start + doc.length - 1] = True
    document = next(d for d in groups[position] if d.start <= K < d.start + d.length)
    scored_before[document.start: K - 1] = True
    torch.testing.assert_close(after[scored_before], before[scored_before], rtol=0, atol=1e-6)
    assert not torch.allclose(after[~scored_before], before[~scored_before])


def test_temperature_divides_softcapped_logits():
    """Condition 2: a fixed T scores softcap(z)/T, a full normalized distribution; T = 1 changes nothing."""
    model, tokens = make_model(), make_stream()
    batch = [Window(0, 0), Window(8, 24)]
    target_bytes = lookup_stream(tokens, TABLES).target_bytes
    scored = score_batch_tokens(model.forward_logits, tokens, target_bytes, batch, 32, CPU, temperature=0.9)
    with torch.no_grad():
        logits = model.forward_logits(tokens[:32][None])[0] / 0.9  # [T, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(32), rtol=0, atol=1e-5)
    torch.testing.assert_close(scored.nll[:32], -log_probs.gather(1, tokens[1:33, None])[:, 0])
    plain = score_batch_tokens(model.forward_logits, tokens, target_bytes, batch, 32, CPU)
    unit = score_batch_tokens(model.forward_logits, tokens, target_bytes, batch, 32, CPU, temperature=1.0)
    assert torch.equal(plain.nll, unit.nll)
    warm = run(dataclasses.replace(BASE, lr=0.0, temperature=0.9), tokens)
    assert warm.score.bpb == pytest.approx(
        eval_sliding(make_model(), lookup_stream(tokens, TABLES), 32, 8, 7, CPU, temperature=0.9).bpb, abs=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_coverage_every_target_once(method):
    """Condition 4: every target scored exactly once; tokens and bytes are evaluate's."""
    tokens = make_stream()
    result = run(METHODS[method], tokens)
    assert torch.equal(result.token_counts, torch.ones(tokens.numel() - 1, dtype=torch.int32))
    assert result.tokens == tokens.numel() - 1
    assert result.bytes == int(count_bytes(tokens[:-1], tokens[1:], TABLES).sum())
    assert sum(row["tokens"] for row in result.chunks) == result.tokens


def test_step_counts_and_last_chunk(monkeypatch):
    """Condition 3 (style A): (C - 1) x epochs x ceil(seqs / batch) steps, each on scored targets only."""
    tokens = make_stream()
    scored_to, trained = [0], []
    original_add, original_step = ttt._Sums.add, ttt._train_step

    def add(self, targets, nll, byte_counts):
        scored_to[0] = max(scored_to[0], int(targets.max()) + 1)
        return original_add(self, targets, nll, byte_counts)

    def step(model, params, optimizer, stream, starts, seq_len, *args, **kwargs):
        trained.append((max(starts) + seq_len, scored_to[0]))
        return original_step(model, params, optimizer, stream, starts, seq_len, *args, **kwargs)

    monkeypatch.setattr(ttt._Sums, "add", add)
    monkeypatch.setattr(ttt, "_train_step", step)
    result = run(BASE, tokens)
    num_chunks = math.ceil((tokens.numel() - 1) / BASE.chunk_tokens)
    seqs = BASE.chunk_tokens // BASE.seq_len
    assert result.optimizer_steps == (num_chunks - 1) * BASE.epochs * math.ceil(seqs / BASE.batch_seqs)
    assert all(end <= frontier for end, frontier in trained)  # trained targets were all scored already
    assert trained[-1][1] < tokens.numel() - 1  # the last chunk was scored after the last step
    assert "lr" not in result.chunks[-1] and result.chunks[-2]["lr"] > 0


def test_document_steps_are_chunks_minus_one():
    """Style B: a document of k chunks gets k - 1 steps; the last chunk is never trained on."""
    tokens = make_stream()
    result = run(METHODS["lora_doc"], tokens)
    chunks = [math.ceil((doc.length - 1) / BASE.lora_chunk_tokens) for doc in ttt.find_documents(tokens)]
    assert result.document_steps == sum(k - 1 for k in chunks)
    groups = ttt.document_groups(ttt.find_documents(tokens), BASE.lora_batch_docs)
    longest = [max(math.ceil((d.length - 1) / BASE.lora_chunk_tokens) for d in g) for g in groups]
    assert result.optimizer_steps == sum(k - 1 for k in longest)


def test_lora_losses_do_not_depend_on_batch_mates():
    tokens = make_stream()
    together = run(dataclasses.replace(METHODS["lora_doc"], lora_batch_docs=5), tokens)
    alone = run(dataclasses.replace(METHODS["lora_doc"], lora_batch_docs=1), tokens)
    torch.testing.assert_close(together.token_nll, alone.token_nll, rtol=0, atol=1e-6)


def test_phases_train_only_on_scored_documents():
    tokens = make_stream()
    result = run(METHODS["phased"], tokens)
    groups = ttt.document_groups(ttt.find_documents(tokens), BASE.lora_batch_docs)
    assert [p["documents"] for p in result.phases] == [3, 6]
    for phase in result.phases:
        scored = {doc.index for group in groups[: phase["after_groups"]] for doc in group}
        assert set(phase["doc_indices"]) <= scored and phase["steps"] > 0
    lora_only = run(METHODS["lora_doc"], tokens)
    assert result.score.bpb != lora_only.score.bpb  # the phases changed the base for later groups


def test_documents_cover_the_stream():
    tokens = torch.tensor([5, 6, BOS_ID, 7, 8, BOS_ID, 9])
    docs = ttt.find_documents(tokens)
    assert [(d.start, d.length) for d in docs] == [(0, 3), (2, 4), (5, 2)]
    assert sum(d.length - 1 for d in docs) == tokens.numel() - 1


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="method: 'rescore' is not a choice"):
        dataclasses.replace(BASE, method="rescore")
    with pytest.raises(ValueError, match="temperature: 0.0 is out of range"):
        dataclasses.replace(BASE, temperature=0.0)


# ------------------------------------------------------------------------------ a non-finite loss is no score


STYLE_A_DIVERGED = "chunk 1 of 7 scored a summed loss of nan: test-time training diverged in the 4 optimizer steps " \
                   "before it"
STYLE_B_DIVERGED = "scored a summed loss of nan: test-time training diverged in its adapters' steps"


@pytest.mark.parametrize("method, diverging, error", [
    ("sgd_all", {"lr": 1e30}, f"{STYLE_A_DIVERGED} (ttt.lr=1e+30)"),
    ("adamw_tail", {"lr": 1e30}, f"{STYLE_A_DIVERGED} (ttt.lr=1e+30)"),
    ("lora_doc", {"lora_lr": 1e30}, f"document group 0 of 5 {STYLE_B_DIVERGED} (ttt.lora_lr=1e+30)"),
    ("phased", {"phase_lr": 1e30},
     f"document group 2 of 5 {STYLE_B_DIVERGED} (ttt.lora_lr=0.01) or the 1 global SGD phase(s) before it "
     "(ttt.phase_lr=1e+30)"),
])
def test_a_diverging_learning_rate_is_an_error_naming_the_method_and_the_chunk(method, diverging, error):
    with pytest.raises(NonFiniteScore) as raised:
        run(dataclasses.replace(METHODS[method], **diverging), make_stream())
    assert str(raised.value) == f"ttt {method}: {error}; there is no score"


def test_sliding_ttt_stops_at_the_first_non_finite_chunk(monkeypatch):
    """Style A checks each chunk's all-reduced sums as it scores them: nothing after a NaN chunk is computed."""
    scored = []
    real = ttt._score_windows
    monkeypatch.setattr(ttt, "_score_windows", lambda *args: scored.append(1) or real(*args))
    with pytest.raises(NonFiniteScore, match="chunk 1 of 7"):
        run(dataclasses.replace(BASE, lr=1e30), make_stream())
    assert len(scored) == 2


def test_a_non_finite_chunk_before_any_step_blames_the_artifact(monkeypatch):
    real = GPT.forward_logits
    monkeypatch.setattr(GPT, "forward_logits", lambda self, *args, **kwargs: real(self, *args, **kwargs) * math.nan)
    with pytest.raises(NonFiniteScore, match="ttt sgd_all: chunk 0 of 7 scored a summed loss of nan: the artifact's "
                                             "own predictions are not finite; there is no score"):
        run(BASE, make_stream())


# ------------------------------------------------------------------------------ processes

WORKER = textwrap.dedent("""
    import dataclasses, json, sys
    import torch
    from pgolf.distributed import init_distributed, shutdown
    from pgolf.data.accounting import lookup_stream
    from pgolf.eval.ttt import run_ttt
    from tests.eval.test_ttt import METHODS, TABLES, make_model, make_stream
    ctx = init_distributed("cpu")
    results = {}
    for method in sys.argv[2:]:
        stream = lookup_stream(make_stream(), TABLES)
        result = run_ttt(make_model(), stream, METHODS[method], ctx.device, ctx, record_tokens=True)
        results[method] = {"bpb": result.score.bpb, "tokens": result.tokens, "bytes": result.bytes,
                           "steps": result.optimizer_steps, "counts": result.token_counts.tolist()}
    if ctx.is_main:
        open(sys.argv[1], "w").write(json.dumps(results))
    shutdown(ctx)
""")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]))
    scores = {}
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(script), str(out), *METHODS]
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        scores[nproc] = json.loads(out.read_text())
    for method in METHODS:
        one, two = scores[1][method], scores[2][method]
        assert (two["tokens"], two["bytes"], two["steps"]) == (one["tokens"], one["bytes"], one["steps"]), method
        assert set(two["counts"]) == {1}, method
        # same steps on the same data: only the float summation order of gradients and sums differs
        assert two["bpb"] == pytest.approx(one["bpb"], abs=1e-5), method


# ------------------------------------------------------------------------------ the stage


@pytest.mark.slow
def test_stage_scores_the_artifact_and_reports_the_gain(stage_workdir):
    from stages import evaluate as evaluate_stage
    from stages import ttt as ttt_stage

    evaluate = {"eval_seq_len": SEQ_LEN, "eval_stride": STRIDE, "eval_batch_seqs": BATCH,
                "max_val_tokens": MAX_TOKENS, "device": "cpu", "eval_plain": False}
    evaluate_stage.run({"evaluate": evaluate}, PIPELINE)
    sliding = json.loads(Path(layout.EVALUATE_METRICS).read_text())["quantized"]["sliding_val_bpb"]
    base = {"seq_len": SEQ_LEN, "stride": STRIDE, "max_val_tokens": MAX_TOKENS, "chunk_tokens": 512,
            "device": "cpu", "compile": False}
    ttt_stage.run({"ttt": base}, PIPELINE)
    switched_off = json.loads(Path(layout.TTT_METRICS).read_text())
    assert switched_off.pop("params_digest") and switched_off == {"enabled": False, "method": "sgd_all"}
    ttt_stage.run({"ttt": base | {"enabled": True, "lr": 0.0}}, PIPELINE)
    metrics = json.loads(Path(layout.TTT_METRICS).read_text())
    assert metrics["val_bpb"] == pytest.approx(sliding, abs=1e-6) and abs(metrics["gain_vs_sliding_bpb"]) < 1e-6
    assert metrics["tokens"] == VAL_TARGETS and metrics["optimizer_steps"] == 3 * 3  # 4 chunks, 3 trained
    assert set(metrics["compliance"]) >= {"causal_prefix", "full_normalized_distribution", "score_before_update",
                                          "single_pass", "seconds"}
    rows = (Path(layout.TTT_PLOTS) / "chunks.csv").read_text().splitlines()
    assert rows[0].startswith("chunk,nll_sum,tokens,bytes") and len(rows) == 5
    assert rendered("running_bpb.png")[:4] == b"\x89PNG"
    ttt_stage.run({"ttt": base | {"enabled": True, "method": "lora_doc", "lora_rank": 4, "lora_lr": 0.01}},
                  PIPELINE)
    metrics = json.loads(Path(layout.TTT_METRICS).read_text())
    assert metrics["method"] == "lora_doc" and metrics["tokens"] == VAL_TARGETS and metrics["document_steps"] > 0
