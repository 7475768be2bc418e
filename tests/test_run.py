import pytest
import torch

from pyro_hvae.run import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, RunError, load_checkpoint, save_checkpoint


def test_checkpoint_round_trips_with_its_version(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"step": 3, "model": {"w": torch.ones(2)}})
    state = load_checkpoint(tmp_path / "a.pt")
    assert state["version"] == CHECKPOINT_VERSION and state["step"] == 3
    assert torch.equal(state["model"]["w"], torch.ones(2))


def test_checkpoint_of_an_older_format_is_refused_with_what_to_do(tmp_path):
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION - 1, "step": 0}, tmp_path / "old.pt")
    with pytest.raises(RunError, match=rf"format version {CHECKPOINT_VERSION - 1}, this version reads {CHECKPOINT_VERSION}; train it again"):
        load_checkpoint(tmp_path / "old.pt")
