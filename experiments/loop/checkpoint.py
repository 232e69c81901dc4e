"""Checkpoint state shared by training and evaluation: ``checkpoint.pt`` in the run folder.

One file holds what a resumed run or an evaluation needs: the trained tensors
(:func:`mora.adapters.adapter_state_dict`, which carries the layers' own state too: MoRA's
sharing groups, whether a base weight holds merged updates), the loop's counters, and for
resuming the optimizer, the LR schedule and the RNGs. Written atomically, so a crash leaves the
last good checkpoint.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import torch
from torch import nn

from experiments.files import atomic_torch_save
from mora.adapters import AdapterConfig, adapter_state_dict, load_adapter_state_dict

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, model: nn.Module, adapter: AdapterConfig, optimizer, scheduler, loop: dict) -> None:
    """Write the trained tensors, the loop counters ``loop``, optimizer, schedule and RNGs to ``path``."""
    atomic_torch_save({
        "loop": loop, "weights": adapter_state_dict(model, adapter),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
    }, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer=None, scheduler=None) -> dict:
    """Load the trained tensors into ``model`` (with adapters injected); returns the loop counters.

    Resuming passes ``optimizer`` and ``scheduler``: their state and the RNGs are restored too.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err) from err
    load_adapter_state_dict(model, ckpt["weights"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
    return ckpt["loop"]


def check_checkpoint(path: Path) -> None:
    """Refuse a damaged ``path`` (a copy cut short, a full disk) before anything is loaded or
    changed; cheap: torch.save writes a zip archive whose directory, at its very end, is all this
    reads, so a truncated file fails here and the tensors are never read."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err, "; to train the run again from step 0, move the checkpoint away") from err


def _unreadable(path: Path, err: Exception, advice: str = "") -> ValueError:
    return ValueError(f"{path} cannot be read ({type(err).__name__}: {err}); the run's metrics and summary are "
                      f"left as they were{advice}")


def _rng_state() -> dict:
    """Python and torch RNGs, CUDA's too: dropout and ReLoRA's Kaiming re-init on a GPU draw from it."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
