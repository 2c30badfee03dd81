"""Plain and sliding evaluation: parity with the reference and the window arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.config import ModelConfig
from pgolf.data.accounting import lookup_stream
from pgolf.data.tokenizer import ByteTables, byte_tables
from pgolf.eval.bpb import Window, eval_plain, eval_sliding, plain_windows, sliding_windows
from pgolf.model.gpt import GPT

CPU = torch.device("cpu")
TOLERANCE = 1e-4  # relative, both sets' README


@pytest.fixture(scope="module")
def golden_eval(golden, golden_config, golden_tokenizer):
    model = GPT(golden_config)
    model.load_state_dict(golden["state_dict"])
    model.looping_active = True
    tables = byte_tables(golden_tokenizer, golden_config.vocab_size)
    return model, tables


def test_plain_evaluation_matches_reference(golden, golden_eval):
    model, tables = golden_eval
    loss, bpb = eval_plain(model, lookup_stream(golden["val_tokens"], tables), 128, 64, CPU)
    expected_loss, expected_bpb = golden["eval_val"]
    assert loss == pytest.approx(expected_loss, rel=TOLERANCE)
    assert bpb == pytest.approx(expected_bpb, rel=TOLERANCE)


def test_sliding_evaluation_matches_reference(golden, golden_eval):
    model, tables = golden_eval
    stride = golden["eval_stride"]
    loss, bpb = eval_sliding(model, lookup_stream(golden["val_tokens"], tables), 128, stride, 64, CPU)
    expected_loss, expected_bpb = golden["eval_val_sliding"]
    assert loss == pytest.approx(expected_loss, rel=TOLERANCE)
    assert bpb == pytest.approx(expected_bpb, rel=TOLERANCE)


# ------------------------------------------------------------------------------ windows


def scored_targets(windows: list[Window], num_tokens: int, seq_len: int) -> list[int]:
    targets = num_tokens - 1
    return [w.start + i for w in windows for i in range(w.score_from, min(seq_len, targets - w.start))]


@pytest.mark.parametrize(
    ("num_tokens", "seq_len", "stride"), [(129, 32, 8), (1000, 64, 16), (100, 16, 16), (58, 64, 8), (97, 10, 3)]
)
def test_sliding_windows_score_every_target_exactly_once(num_tokens, seq_len, stride):
    windows = sliding_windows(num_tokens, seq_len, stride)
    assert scored_targets(windows, num_tokens, seq_len) == list(range(num_tokens - 1))
    assert all(w.score_from == seq_len - stride for w in windows[1:])
    assert all(w.start + seq_len - stride < num_tokens - 1 for w in windows)


def test_sliding_windows_need_more_targets_than_the_context():
    # the reference's rule: no window at all when start + seq_len - stride never falls short of the end
    assert sliding_windows(40, 64, 8) == []


def test_plain_windows_are_consecutive_full_sequences():
    assert plain_windows(3 * 16 + 5, 16) == [Window(0, 0), Window(16, 0), Window(32, 0)]
    assert plain_windows(16, 16) == []


def test_sliding_stride_must_fit_the_sequence():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 16, 17)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 16, 0)


# ------------------------------------------------------------------ tiny-model behaviour


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=1,
                      rope_dims=8, rope_train_seq_len=32, xsa_last_n=2, num_loops=1, loop_start=0, loop_end=1)
    model = GPT(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # no zero-initialised projections
    model.looping_active = True
    tokens = torch.randint(1, 64, (16 * 12 + 1,))
    tables = ByteTables(
        base_bytes=torch.arange(64, dtype=torch.int16) % 4,
        has_leading_space=torch.arange(64) % 3 == 0,
        is_boundary=torch.arange(64) < 2,
    )
    return model, tokens, tables


def manual_score(model, tokens, tables, seq_len) -> tuple[float, float]:
    """Loss and bpb of full consecutive windows, computed the obvious way."""
    x = tokens[:-1].reshape(-1, seq_len)
    y = tokens[1:].reshape(-1, seq_len)
    with torch.no_grad():
        loss = model(x, y).item()
    space = tables.has_leading_space[y] & ~tables.is_boundary[x]
    num_bytes = (tables.base_bytes[y].double() + space.double()).sum().item()
    return loss, loss / math.log(2) * y.numel() / num_bytes


def test_plain_evaluation_is_the_mean_loss_over_windows(tiny):
    model, tokens, tables = tiny
    loss, bpb = eval_plain(model, lookup_stream(tokens, tables), 16, 5, CPU)
    expected_loss, expected_bpb = manual_score(model, tokens, tables, 16)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert bpb == pytest.approx(expected_bpb, rel=1e-6)


def test_sliding_with_stride_equal_to_seq_len_is_plain(tiny):
    model, tokens, tables = tiny
    plain = eval_plain(model, lookup_stream(tokens, tables), 16, 4, CPU)
    assert eval_sliding(model, lookup_stream(tokens, tables), 16, 16, 4, CPU) == pytest.approx(plain, rel=1e-9)


def test_sliding_gives_context_and_does_not_depend_on_batching(tiny):
    model, tokens, tables = tiny
    one = eval_sliding(model, lookup_stream(tokens, tables), 16, 4, 1, CPU)
    seven = eval_sliding(model, lookup_stream(tokens, tables), 16, 4, 7, CPU)
    assert one == pytest.approx(seven, rel=1e-9)
    assert one.loss != pytest.approx(eval_plain(model, lookup_stream(tokens, tables), 16, 4, CPU).loss, rel=1e-6)


def test_sliding_handles_a_short_last_window(tiny):
    model, tokens, tables = tiny
    ragged = tokens[:16 * 5 + 8]  # the last windows run past the end
    scores = eval_sliding(model, lookup_stream(ragged, tables), 16, 4, 3, CPU)
    assert math.isfinite(scores.loss) and scores.bpb > 0


def test_too_few_tokens_is_a_clear_error(tiny):
    model, tokens, tables = tiny
    with pytest.raises(ValueError, match="too few"):
        eval_plain(model, lookup_stream(tokens[:10], tables), 16, 4, CPU)
