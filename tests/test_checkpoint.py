"""Atomic checkpoints: keys, round trip, no torn files, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from peer.training import checkpoint as ckpt


def _model_and_opt() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_has_required_keys_and_restores_rng(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    path = ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=opt, step=7)
    assert path.name == "rank-3.pt"
    expected = torch.rand(3)
    payload = ckpt.load_checkpoint(path)
    assert set(ckpt.CHECKPOINT_KEYS) <= set(payload)
    assert payload["step"] == 7
    ckpt.set_rng_state(payload["rng"])
    # the RNG stream continues where it was when the checkpoint was written
    assert torch.equal(torch.rand(3), expected)
    fresh, fresh_opt = (
        torch.nn.Linear(3, 2),
        torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9),
    )
    fresh.load_state_dict(payload["model"])
    assert torch.equal(fresh.weight, model.weight)
    assert payload["optimizer"]["state"][0]["momentum_buffer"].shape == (2, 3)
    del fresh_opt


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model, opt = _model_and_opt()
    path = ckpt.save_checkpoint(tmp_path, 0, model=model, optimizer=opt, step=1)
    before = path.read_bytes()

    def exploding_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 0, model=model, optimizer=opt, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rank-0.pt"]  # no temp file left behind


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.load_checkpoint(tmp_path / "rank-0.pt")
    bad = tmp_path / "rank-1.pt"
    bad.write_bytes(os.urandom(64))  # random bytes: an unpickling error or another one
    with pytest.raises(ValueError, match=r"rank-1\.pt (refused|is unreadable)"):
        ckpt.load_checkpoint(bad)
    torch.save({"model": {}}, tmp_path / "rank-2.pt")
    with pytest.raises(ValueError, match="lacks optimizer, step, rng"):
        ckpt.load_checkpoint(tmp_path / "rank-2.pt")


class _Exploit:
    """Unpickling this runs ``open(marker, "w")``: code execution from a checkpoint file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_checkpoint_with_a_malicious_pickle_is_refused(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    path = ckpt.save_checkpoint(tmp_path, 0, model=model, optimizer=opt, step=1)
    payload = ckpt.load_checkpoint(path)
    marker = tmp_path / "pwned"
    payload["extra"] = _Exploit(marker)
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"refused: it holds io\.open"):
        ckpt.load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran code from it"
