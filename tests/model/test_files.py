"""Model, Hessian and resume files: checksums that catch a flipped bit, and weights that must be finite."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from pgolf.config import ModelConfig, to_dict
from pgolf.model.files import (
    FORMAT,
    VERSION,
    build_model,
    check_finite,
    load_model,
    load_tagged,
    save_model,
    save_tagged,
)
from pgolf.model.gpt import GPT

CONFIG = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=1,
                     rope_dims=8, xsa_last_n=2, num_loops=0)


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return GPT(CONFIG).state_dict()


def flip_bit_in_tensor_data(path: Path, member_suffix: str = "") -> None:
    """Flip one bit in the middle of the largest tensor record of a torch zip file (stored uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        records = [info for info in archive.infolist() if "/data/" in info.filename
                   and info.filename.endswith(member_suffix)]
        record = max(records, key=lambda info: info.file_size)
        with open(path, "rb") as handle:  # the local header: 30 bytes, then the name and the extra field
            handle.seek(record.header_offset + 26)
            name_len, extra_len = (int.from_bytes(handle.read(2), "little") for _ in range(2))
        offset = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_model_file_round_trips_with_its_checksum(tmp_path):
    path = tmp_path / "model.pt"
    save_model(path, CONFIG, weights())
    payload = torch.load(path, weights_only=True)
    assert payload["version"] == VERSION == 2 and payload["checksum"].startswith("sha256:")
    cfg, state = load_model(path)
    assert cfg == CONFIG
    for name, tensor in weights().items():
        assert torch.equal(state[name], tensor)


def test_a_flipped_bit_in_tensor_data_is_caught_and_names_the_file(tmp_path):
    path = tmp_path / "model.pt"
    save_model(path, CONFIG, weights())
    flip_bit_in_tensor_data(path)
    torch.load(path, weights_only=True)  # torch itself loads the damaged file without a word
    with pytest.raises(ValueError, match=rf"^{path}: model file is corrupt: its contents do not match the checksum"):
        load_model(path)
    with pytest.raises(ValueError, match="corrupt"):
        build_model(path)


def test_hessians_and_resume_checkpoints_are_checked_too(tmp_path):
    path = tmp_path / "hessians.pt"
    save_tagged(path, "pgolf-hessians", 1, {"hessians": {"a.weight": torch.eye(64), "b.weight": torch.ones(8, 8)}})
    assert torch.equal(load_tagged(path, "pgolf-hessians", 1, "Hessians file")["hessians"]["a.weight"], torch.eye(64))
    flip_bit_in_tensor_data(path)
    with pytest.raises(ValueError, match=rf"^{path}: Hessians file is corrupt"):
        load_tagged(path, "pgolf-hessians", 1, "Hessians file")


def test_a_changed_plain_value_breaks_the_checksum_too(tmp_path):
    path = tmp_path / "model.pt"
    save_model(path, CONFIG, weights())
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["num_layers"] = 3
    torch.save(payload, path)
    with pytest.raises(ValueError, match="corrupt"):
        load_model(path)


def test_version_1_files_without_a_checksum_are_still_read_but_version_2_ones_must_have_it(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "version": 1, "model_config": to_dict(CONFIG), "state_dict": weights()}, path)
    assert load_model(path)[0] == CONFIG
    torch.save({"format": FORMAT, "version": 2, "model_config": to_dict(CONFIG), "state_dict": weights()}, path)
    with pytest.raises(ValueError, match=rf"^{path}: model file of version 2 without its checksum"):
        load_model(path)
    torch.save({"format": FORMAT, "version": 3, "model_config": to_dict(CONFIG), "state_dict": weights()}, path)
    with pytest.raises(ValueError, match=rf"^{path}: model file version 3, this pgolf reads 1 or 2$"):
        load_model(path)


def test_non_finite_weights_are_refused_on_saving_and_on_loading(tmp_path):
    state = weights()
    state["blocks.1.mlp.fc.weight"][3, 4] = float("nan")
    state["skip_weights"][0, 0] = float("inf")
    path = tmp_path / "model.pt"
    with pytest.raises(ValueError, match=rf"^{path}: refusing to save: non-finite weights \(NaN or inf\) in "
                                         r"skip_weights \(1 of 32\), blocks.1.mlp.fc.weight \(1 of 4096\)$"):
        save_model(path, CONFIG, state)
    assert not path.exists()
    save_tagged(path, FORMAT, VERSION, {"model_config": to_dict(CONFIG), "state_dict": state})  # e.g. a foreign tool
    with pytest.raises(ValueError, match=rf"^{path}: non-finite weights \(NaN or inf\) in skip_weights"):
        load_model(path)


def test_check_finite_ignores_integer_tensors_and_names_at_most_five():
    check_finite({"codes": torch.tensor([1, 2], dtype=torch.int8), "w": torch.ones(3)}, "x")
    many = {f"t{i}": torch.full((2,), float("nan")) for i in range(7)}
    with pytest.raises(ValueError, match=r"^artifact: non-finite weights .* t4 \(2 of 2\) and 2 more tensors$"):
        check_finite(many, "artifact")


class RunsCode:
    """An object whose unpickling would call a function: what a hostile model file holds."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_file_that_would_run_code_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "version": VERSION, "model_config": RunsCode(), "state_dict": {}}, path)
    with pytest.raises(ValueError, match=rf"^{path}: not a readable model file: "):
        load_model(path)
    assert "this must never run" not in capsys.readouterr().out
