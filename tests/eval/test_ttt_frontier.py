"""#1855's test-time training: LoRA alpha, warm-start A, the record's phase rule and packed phase rows.

The options on the micro model of tests/eval/test_ttt.py, each against what the record does written
out here; then the golden TTT keys of ``../shared/golden/golden_frontier_tiny.pt`` (README "Frontier
record"), computed by the record's own ``eval_val_ttt_phased`` on a tiny F11 model: documents and
queue exact, the phases' token streams exact, the learning-rate-0 score equal to the base model's
chunked score within 1e-6, and the adapted scores within 3e-4 with the record's A draws.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import TTTConfig
from pgolf.data.accounting import sidecar_stream
from pgolf.data.shards import BOS_ID
from pgolf.eval import ttt
from pgolf.eval.lora import RECORD_DRAW_ORDER, DocumentLoRA
from tests.eval.test_ttt import BASE, CPU, METHODS, VOCAB, make_model, make_stream, run
from tests.model.test_frontier import GOLDEN, golden_model

PHASED = METHODS["phased"]
WARM = dataclasses.replace(PHASED, lora_warm_start_a=True)


# ------------------------------------------------------------------------------ alpha


def test_lora_alpha_scales_every_adapter_output_exactly():
    """α 144 at rank 80 multiplies each correction by exactly 1.8 (docs/TTT.md); None leaves it as is."""
    model = make_model()
    plain = DocumentLoRA(model, num_docs=2, rank=80)
    scaled = DocumentLoRA(model, num_docs=2, rank=80, alpha=144.0)
    plain.reset([3, 4])
    with torch.no_grad():
        plain.B.normal_()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 32)
    for slot in range(plain.num_slots):
        for kind in ("q", "k", "v", "o", "mlp"):
            assert torch.equal(getattr(scaled.block(slot), kind)(x), getattr(plain.block(slot), kind)(x) * 1.8)
    assert torch.equal(scaled.head(x), plain.head(x) * 1.8)
    tokens = make_stream()[:20].repeat(2, 1)
    with torch.no_grad():
        by_alpha = model.forward_logits(tokens, adapter=scaled)
        plain.B.mul_(1.8)
        by_b = model.forward_logits(tokens, adapter=plain)
    torch.testing.assert_close(by_alpha, by_b, rtol=1e-4, atol=1e-4)  # float rounding through the network


def test_lora_alpha_changes_the_adapted_score_only():
    tokens = make_stream()
    plain, scaled = run(PHASED, tokens), run(dataclasses.replace(PHASED, lora_alpha=24.0), tokens)
    assert scaled.score.bpb != plain.score.bpb
    frozen = dataclasses.replace(PHASED, lora_lr=0.0, phase_lr=0.0)
    assert run(dataclasses.replace(frozen, lora_alpha=24.0), tokens).score.bpb == run(frozen, tokens).score.bpb


# ------------------------------------------------------------------------------ warm-start A


def group_events(monkeypatch) -> list[dict]:
    """Each scored group (its documents, adapter set, A and B before, A after, optimiser) and each phase, in order."""
    events: list[dict] = []
    score, phase = ttt.score_document_group, ttt.global_sgd_phase

    def scored(model, tokens, target_bytes, group, lora, optimizer, *args):
        events.append({"docs": [d.index for d in group], "lora": lora, "optimizer": optimizer,
                       "optimizer_state": len(optimizer.state),
                       "a_before": lora.A.detach().clone(), "b_before": lora.B.detach().clone()})
        result = score(model, tokens, target_bytes, group, lora, optimizer, *args)
        events[-1]["a_after"] = lora.A.detach().clone()
        return result

    def phased(*args, **kwargs):
        events.append({"phase": True})
        return phase(*args, **kwargs)

    monkeypatch.setattr(ttt, "score_document_group", scored)
    monkeypatch.setattr(ttt, "global_sgd_phase", phased)
    return events


def fresh_a(cfg: TTTConfig, docs: list[int]) -> torch.Tensor:
    """The A a group of ``docs`` draws fresh (per document, from the documents' seeds)."""
    lora = DocumentLoRA(make_model(), len(docs), cfg.lora_rank)
    lora.reset([cfg.seed * 2**32 + index for index in docs])
    return lora.A.detach()


def test_warm_start_keeps_a_across_the_groups_of_a_phase_and_resets_after_it(monkeypatch):
    """14 documents in groups of 3 (one of 2, the longest, first), pauses after groups 2 and 3.

    Within a phase the full-size groups share one set: A goes on from where the last group left
    it (not its draw: the steps and weight decay moved it), B and the optimiser start at zero.
    The odd-size group and the first full-size group after each phase draw a fresh A.
    """
    events = group_events(monkeypatch)
    run(WARM, make_stream())
    assert ["phase" if "phase" in e else len(e["docs"]) for e in events] == [2, 3, "phase", 3, "phase", 3, 3]
    odd, first, _, after_one, _, after_two, last = events
    for event in (odd, first, after_one, after_two):
        assert torch.equal(event["a_before"], fresh_a(WARM, event["docs"]))
    assert odd["lora"] is not first["lora"] and first["lora"] is not after_one["lora"]
    assert last["lora"] is after_two["lora"] and last["optimizer"] is not after_two["optimizer"]
    assert torch.equal(last["a_before"], after_two["a_after"])
    assert not torch.equal(after_two["a_after"], after_two["a_before"])
    assert all(not e["b_before"].any() for e in events if "docs" in e)
    assert all(e["optimizer_state"] == 0 for e in events if "docs" in e)  # Adam's moments and step start afresh


def test_without_warm_start_every_group_draws_a_fresh_a(monkeypatch):
    events = group_events(monkeypatch)
    run(PHASED, make_stream())
    for event in (e for e in events if "docs" in e):
        assert torch.equal(event["a_before"], fresh_a(PHASED, event["docs"]))


def test_warm_start_gives_up_batch_independence():
    """A document's A now carries the earlier groups' steps: its losses depend on what ran before it."""
    tokens = make_stream()
    warm = dataclasses.replace(METHODS["lora_doc"], lora_warm_start_a=True)
    together = run(dataclasses.replace(warm, lora_batch_docs=5), tokens)
    alone = run(dataclasses.replace(warm, lora_batch_docs=1), tokens)
    assert not torch.allclose(together.token_nll, alone.token_nll, rtol=0, atol=1e-6)


def test_record_draws_follow_the_records_module_order():
    """``lora_draws: record``: the head's A, then each kind's slots in #1855's order (q, v, k, mlp, o), each a
    [docs, r, in] uniform draw, from one generator seeded with ``ttt.seed`` (the record: torch's global one)."""
    cfg = dataclasses.replace(WARM, lora_draws="record", seed=1862)
    adapters = ttt.GroupAdapters(make_model(), cfg)
    lora = adapters.kept
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        for factor in [lora.head_factor, *(lora.factors[(slot, kind)] for kind in RECORD_DRAW_ORDER
                                           for slot in range(lora.num_slots))]:
            bound = 1.0 / math.sqrt(factor.in_features)
            drawn = torch.empty(cfg.lora_batch_docs, cfg.lora_rank, factor.in_features).uniform_(-bound, bound)
            a = lora.A[:, factor.a_offset: factor.a_offset + cfg.lora_rank * factor.in_features]
            assert torch.equal(a, drawn.flatten(1))
        next_draw = torch.rand(1)
    assert not lora.B.any()
    assert torch.equal(torch.rand(1, generator=adapters.generator), next_draw)  # nothing else drawn in between


# ------------------------------------------------------------------------------ the record's phase rule


def record_phase_sets(groups: list[list[ttt.Document]], batch_docs: int, prefix_docs: int,
                      count: int) -> list[tuple[int, list[int]]]:
    """(groups done, document indices in training order) of each pause, as #1855's ``eval_val_ttt_phased``
    meets them on one process: after each group, its documents join the local list as (length-sorted
    group index, position); the pause flag rises when the counter reaches the current boundary; the
    phase sorts the list and keeps the first ``boundary``; the flag is lowered for the next one."""
    ordered = sorted((d for g in groups for d in g), key=lambda d: (d.length, d.index))
    sorted_index = {d.index: i // batch_docs for i, d in enumerate(ordered)}
    prefix = max(0, min(len(ordered), prefix_docs))
    boundaries = [prefix * (k + 1) // max(1, count) for k in range(max(1, count))]
    scored, counter, phase, done, sets = [], 0, 0, prefix == 0, []
    for finished, group in enumerate(groups, start=1):
        if done:
            continue
        scored.extend((sorted_index[d.index], pos, d.index) for pos, d in enumerate(group))
        counter += len(group)
        if counter >= boundaries[phase]:
            chosen = sorted(scored)[:boundaries[phase]]
            sets.append((finished, [index for _, _, index in chosen]))
            phase += 1
            done = phase >= count
    return sets


@pytest.mark.parametrize(("batch_docs", "prefix_docs", "count"), [(3, 7, 3), (4, 6, 3), (2, 9, 2), (5, 40, 3)])
def test_shortest_rule_is_the_records_selection(batch_docs, prefix_docs, count):
    """Pauses and training sets equal the record's, written out above (minus its pause after the last group)."""
    docs = ttt.find_documents(make_stream(num_docs=17, seed=3))
    groups = ttt.document_groups(docs, batch_docs)
    expected = [(end, indices) for end, indices in record_phase_sets(groups, batch_docs, prefix_docs, count)
                if end < len(groups)]
    pauses = ttt.shortest_rule_pauses(groups, prefix_docs, count)
    assert [end for _, end in pauses] == [end for end, _ in expected]
    assert [[d.index for d in ttt.phase_documents(groups[:end], boundary, "shortest")] for boundary, end in pauses] \
        == [indices for _, indices in expected]


def test_shortest_rule_differs_from_the_queue_rule():
    """On 14 documents in groups of 3: the queue rule's phases hold the longest documents, the record's the
    shortest scored."""
    groups = ttt.document_groups(ttt.find_documents(make_stream()), 3)
    queue = [ttt.phase_documents(groups[:end], n, "queue") for n, end in ttt.phase_boundaries(groups, 6, 2)]
    shortest = [ttt.phase_documents(groups[:end], n, "shortest") for n, end in ttt.shortest_rule_pauses(groups, 6, 2)]
    assert [len(p) for p in queue] == [len(p) for p in shortest] == [3, 6]
    assert [d.index for d in queue[0]] == [d.index for g in groups[:2] for d in g][:3]
    assert max(d.length for d in shortest[1]) < max(d.length for d in queue[1])


def test_phased_run_trains_each_phase_on_the_records_documents():
    tokens = make_stream()
    cfg = dataclasses.replace(WARM, phase_rule="shortest")
    result = run(cfg, tokens)
    groups = ttt.document_groups(ttt.find_documents(tokens), cfg.lora_batch_docs)
    expected = record_phase_sets(groups, cfg.lora_batch_docs, cfg.phase_prefix_docs, cfg.phase_count)
    assert [(p["after_groups"], p["doc_indices"]) for p in result.phases] == [e for e in expected if e[0] < len(groups)]
    assert torch.equal(result.token_counts, torch.ones(tokens.numel() - 1, dtype=torch.int32))


# ------------------------------------------------------------------------------ packed phase rows


def test_packed_row_loss_is_the_records_segments():
    """A row starting inside a document, a closing BOS then the next document's BOS, cap 8: the loss sums
    every target (the closing BOS's too) with attention inside [0,8) [8,10) [10,11) [11,19) [19,24)."""
    model = make_model()
    words = torch.randint(2, VOCAB, (23,), generator=torch.Generator().manual_seed(5))
    row = torch.cat([words[:10], torch.tensor([BOS_ID, BOS_ID]), words[10:]])  # [25]: 24 inputs + 1 label
    assert row[:24].eq(BOS_ID).nonzero().flatten().tolist() == [10, 11]
    with torch.no_grad():
        loss, count = ttt._packed_row_loss(model, row, 0, 24, 8, CPU)
        expected = sum(F.cross_entropy(model.forward_logits(row[a:b][None])[0], row[a + 1:b + 1], reduction="sum")
                       for a, b in [(0, 8), (8, 10), (10, 11), (11, 19), (19, 24)])
    assert int(count) == 24
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_packed_phase_rows_change_the_phase_not_the_coverage():
    tokens = make_stream()
    windows = run(PHASED, tokens)
    packed = run(dataclasses.replace(PHASED, phase_rows="packed", phase_seq_len=16), tokens)
    assert [p["steps"] for p in packed.phases] != [p["steps"] for p in windows.phases]  # 16-token rows: more steps
    assert packed.score.bpb != windows.score.bpb
    assert torch.equal(packed.token_counts, windows.token_counts)


def test_bad_ttt_options_name_the_key():
    with pytest.raises(ValueError, match="phase_rule: 'timing' is not a choice"):
        dataclasses.replace(BASE, phase_rule="timing")
    with pytest.raises(ValueError, match="lora_alpha: 0.0 is out of range"):
        dataclasses.replace(BASE, lora_alpha=0.0)


# ------------------------------------------------------------------------------ the golden TTT keys


@pytest.fixture(scope="module")
def golden() -> dict:
    from tests.conftest import _load, _require
    return _load(_require(GOLDEN))


def golden_config(golden: dict) -> TTTConfig:
    """The record's TTT settings of the golden run (its environment variables), with its A draws."""
    env = golden["config"]
    return TTTConfig(
        enabled=True, method="phased", seq_len=env["TTT_EVAL_SEQ_LEN"], seed=golden["eval"]["ttt_torch_seed"],
        lora_rank=env["TTT_LORA_RANK"], lora_lr=env["TTT_LORA_LR"], lora_chunk_tokens=env["TTT_CHUNK_SIZE"],
        lora_batch_docs=env["TTT_BATCH_SIZE"], lora_beta1=env["TTT_BETA1"], lora_beta2=env["TTT_BETA2"],
        lora_weight_decay=env["TTT_WEIGHT_DECAY"], lora_steps=env["TTT_GRAD_STEPS"], lora_k=bool(env["TTT_K_LORA"]),
        lora_o=bool(env["TTT_O_LORA"]), lora_mlp=bool(env["TTT_MLP_LORA"]), lora_alpha=env["TTT_LORA_ALPHA"],
        lora_warm_start_a=bool(env["TTT_WARM_START_A"]), lora_draws="record",
        phase_prefix_docs=env["PHASED_TTT_PREFIX_DOCS"], phase_count=env["PHASED_TTT_NUM_PHASES"],
        phase_lr=env["GLOBAL_TTT_LR"], phase_momentum=env["GLOBAL_TTT_MOMENTUM"],
        phase_chunk_tokens=env["GLOBAL_TTT_CHUNK_TOKENS"], phase_epochs=env["GLOBAL_TTT_EPOCHS"],
        phase_grad_clip=env["GLOBAL_TTT_GRAD_CLIP"], batch_seqs=env["GLOBAL_TTT_BATCH_SEQS"],
        phase_rule="shortest", phase_rows="packed", phase_seq_len=env["EVAL_SEQ_LEN"], device="cpu", compile=False)


def golden_run(golden: dict, cfg: TTTConfig) -> ttt.TTTResult:
    stream = sidecar_stream(golden["eval"]["val_tokens"].long(), golden["eval"]["val_bytes"])
    return ttt.run_ttt(golden_model(golden, looping=True), stream, cfg, CPU)


def test_golden_documents_and_queue(golden):
    ref = golden["eval"]
    docs = ttt.find_documents(ref["val_tokens"].long())
    assert [[d.start, d.length] for d in docs] == ref["ttt_docs"]
    batch = golden["config"]["TTT_BATCH_SIZE"]
    ordered = sorted(docs, key=lambda d: (d.length, d.index))
    sorted_index = {d.index: i // batch for i, d in enumerate(ordered)}
    queue = [{"group": sorted_index[g[0].index], "docs": [[d.index, d.start, d.length] for d in g]}
             for g in ttt.document_groups(docs, batch)]
    assert queue == ref["ttt_queue"]


def test_golden_phase_token_streams(golden):
    """The record's three phases train on 2, 4 and 6 documents, the shortest scored: token for token. The
    third pause comes after the last group (nothing left to score), so pgolf leaves it out of the run."""
    ref, cfg = golden["eval"], golden_config(golden)
    tokens = ref["val_tokens"].long()
    groups = ttt.document_groups(ttt.find_documents(tokens), cfg.lora_batch_docs)
    pauses = ttt.phase_pauses(groups, cfg)
    assert pauses == [(2, 1), (4, 2)]
    chosen = []
    for (boundary, end), expected in zip([*pauses, (6, 3)], ref["ttt_phased"]["global_phase_tokens"], strict=True):
        chosen.append(ttt.phase_documents(groups[:end], boundary, cfg.phase_rule))
        assert torch.equal(torch.cat([tokens[d.start:d.start + d.length] for d in chosen[-1]]), expected.long())
    assert not {d.index for d in chosen[0]} & {d.index for d in chosen[1]}  # the second phase drops the first's
    queue = ttt.phase_documents(groups[:2], 4, "queue")  # pgolf's rule picks other documents
    assert torch.cat([tokens[d.start:d.start + d.length] for d in queue]).numel() != \
        ref["ttt_phased"]["global_phase_tokens"][1].numel()


@pytest.mark.parametrize("settings", ["record", "pgolf"])
def test_golden_zero_lr_is_the_base_models_chunked_score(golden, settings):
    """LoRA and phase lr 0: the record's chunked base score within 1e-6, with its settings or pgolf's defaults."""
    cfg = dataclasses.replace(golden_config(golden), lora_lr=0.0, phase_lr=0.0)
    if settings == "pgolf":
        cfg = dataclasses.replace(cfg, lora_alpha=None, lora_warm_start_a=False, lora_draws="document",
                                  phase_rule="queue", phase_rows="windows")
    result = golden_run(golden, cfg)
    loss, bpb = golden["eval"]["base_chunked"]
    assert result.score.loss == pytest.approx(loss, rel=1e-6)
    assert result.score.bpb == pytest.approx(bpb, rel=1e-6)
    lr0 = golden["eval"]["ttt_phased_lr0"]
    assert (result.score.loss, result.score.bpb) == pytest.approx((lr0["loss"], lr0["bpb"]), rel=1e-6)
    assert result.tokens == golden["eval"]["val_tokens"].numel() - 1
    assert result.bytes == int(golden["eval"]["val_bytes"][1:].sum())


@pytest.mark.parametrize("key", ["ttt_phased", "ttt_lora_only"])
def test_golden_adapted_score(golden, key):
    """lr > 0 with the record's A draws, α 144, warm-start A, its phase rule and packed rows: within 3e-4."""
    cfg = golden_config(golden)
    if key == "ttt_lora_only":
        cfg = dataclasses.replace(cfg, phase_prefix_docs=0)
    result = golden_run(golden, cfg)
    ref = golden["eval"][key]
    assert result.score.loss == pytest.approx(ref["loss"], rel=3e-4)
    assert result.score.bpb == pytest.approx(ref["bpb"], rel=3e-4)
    assert len(result.phases) == (2 if key == "ttt_phased" else 0)  # the record's third comes after the last group
