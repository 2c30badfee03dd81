"""``pgolf import FINAL_MODEL_PT``: a reference ``final_model.pt`` as the train stage's output.

The record's ``train_gpt.py`` saves its EMA weights as a plain state dict in its
own parameter names (the frontier's, PR #1855, keeps its block matrices in four
3-D banks, which are read back into the per-layer names). This command reads one (``weights_only=True``), checks
every name and shape against ``GPT`` built from the ``model:`` section, and
writes it as the train stage's model file of the hand-run workspace (``runs/``
unless ``--out`` says otherwise), so ``pgolf calibrate``, ``quantize``,
``compress`` and ``evaluate`` run on it there without training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from pgolf.atomic import stage_outputs
from pgolf.config import ModelConfig, section, to_dict
from pgolf.model.files import check_state_dict, save_model
from pgolf.model.gpt import GPT
from pgolf.pipeline import layout
from pgolf.pipeline.provenance import log_provenance
from pgolf.pipeline.stage import Workspace, run_stage, stage_parser


def read_reference_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a reference ``final_model.pt`` (a flat name -> tensor mapping)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or pickled-object file
        raise ValueError(f"{path}: not a weights-only torch state dict: {exc}") from exc
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor)")
    return unbank_state_dict(state) if "mlp_up_bank" in state else state


# PR #1855's banks (docs/FRONTIER.md): slot i is layer i's first matrix, slot n + i its second.
BANKS = {"qo_bank": ("attn.c_q", "attn.proj"), "kv_bank": ("attn.c_k", "attn.c_v"),
         "mlp_up_bank": ("mlp.fc",), "mlp_down_bank": ("mlp.proj",)}


def unbank_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A banked state dict under the per-layer names ``blocks.i.attn.c_q.weight`` etc.; the rest as is."""
    num_layers = state["mlp_up_bank"].size(0)
    misfit = [f"{bank} ({'missing' if bank not in state else f'{state[bank].size(0)} slots'})"
              for bank, matrices in BANKS.items()
              if bank not in state or state[bank].size(0) != len(matrices) * num_layers]
    if misfit:
        raise ValueError(f"a banked state dict of {num_layers} layers needs every bank with one slot per layer "
                         f"and matrix: {', '.join(misfit)}")
    out = {name: t for name, t in state.items() if name not in BANKS}
    for bank, matrices in BANKS.items():
        for slot, name in enumerate(matrices):
            for layer in range(num_layers):
                out[f"blocks.{layer}.{name}.weight"] = state[bank][slot * num_layers + layer]
    return out


def import_model(source: Path, cfg: ModelConfig, destination: Path) -> dict[str, Tensor]:
    """Check ``source`` against ``GPT(cfg)`` and write it to ``destination``."""
    state = read_reference_state_dict(source)
    check_state_dict(GPT(cfg), state, f"{source} (params model: section)")
    save_model(destination, cfg, state)
    return state


def run(params: dict, ws: Workspace, final_model_pt: str) -> None:
    cfg = section(params, "model", ModelConfig)
    ws = ws.begin("import", params)
    record = log_provenance("import", {"model": to_dict(cfg), "source": final_model_pt})
    source, destination = Path(final_model_pt), ws.output(layout.TRAIN_MODEL)
    ws.lineage.read(final_model_pt, source)  # the record's file, by its hash
    with stage_outputs() as out:  # the train stage's model, with the record that says it was imported
        state = import_model(source, cfg, out.path(destination))
        ws.lineage.commit(out, ws.output(layout.TRAIN_PROVENANCE), record)
    print(f"[pgolf import] wrote {destination}: {len(state)} tensors, "
          f"{sum(t.numel() for t in state.values()):,} parameters from {final_model_pt}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("import")
    parser.add_argument("final_model_pt", help="a final_model.pt written by the record's train_gpt.py")
    return run_stage("import", run, argv, parser)


if __name__ == "__main__":
    sys.exit(main())
