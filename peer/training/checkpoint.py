"""Atomic checkpoints of one peer: ``rank-<r>.pt`` with model, optimizer, step and RNG state.

A checkpoint is written to a temporary file in the target directory, flushed and fsynced,
renamed over the final name (atomic on POSIX), and the directory is fsynced, so a crash at any
moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("model", "optimizer", "step", "rng")


def checkpoint_path(directory: str | os.PathLike[str], rank: int) -> Path:
    """Path of peer ``rank``'s checkpoint in ``directory``."""
    return Path(directory) / f"rank-{rank}.pt"


def rng_state() -> dict[str, Any]:
    """Every random number generator a training step may use (torch, CUDA, numpy, random).

    Only tensors and plain Python values, so that :func:`load_checkpoint` can read it back with
    ``torch.load(weights_only=True)`` (numpy's state is stored as a tensor and primitives).
    """
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["bit_generator"],
            saved["key"].numpy().astype(np.uint32),
            saved["pos"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to ``path`` atomically (temp file, fsync, rename, fsync directory).

    Returns:
        The final path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def save_checkpoint(
    directory: str | os.PathLike[str],
    rank: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``rank-<rank>.pt`` with keys ``model``, ``optimizer``, ``step``, ``rng`` (+ extra).

    Args:
        directory: checkpoint directory (created if missing).
        rank: peer rank.
        model: the model (its ``state_dict`` is saved).
        optimizer: the optimizer (its ``state_dict``, momentum buffers and step count included).
        step: the number of completed iterations.
        extra: further picklable entries (e.g. the manifest digest).

    Returns:
        The checkpoint path.
    """
    payload: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "rng": rng_state(),
    }
    if extra:
        payload.update(extra)
    path = save_atomic(payload, checkpoint_path(directory, rank))
    logger.info("checkpoint written: %s (step %d)", path, step)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint and check it has every required key.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain Python values
    only, so a checkpoint cannot run code when it is loaded (a pickle of anything else is
    refused).

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the file is not a decentlam checkpoint (keys missing, unreadable, or
            holding objects other than tensors and plain values).
    """
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"no checkpoint at {target}")
    try:
        payload = torch.load(target, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        what = found.group(1) if found else "an object that is not a tensor or a plain value"
        raise ValueError(
            f"checkpoint {target} refused: it holds {what} (only tensors and plain values are "
            "loaded: anything else could run code)"
        ) from exc
    except Exception as exc:
        raise ValueError(f"checkpoint {target} is unreadable: {exc}") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {target} is not a dict")
    missing = [key for key in CHECKPOINT_KEYS if key not in payload]
    if missing:
        raise ValueError(f"checkpoint {target} lacks {', '.join(missing)}")
    return payload
