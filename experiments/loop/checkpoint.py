"""Checkpoint state shared by training and evaluation: ``checkpoint.pt`` in the run folder.

One file holds what a resumed run or an evaluation needs: the trained tensors
(:func:`mora.adapters.adapter_state_dict`, which carries the layers' own state too: MoRA's
sharing groups, whether a base weight holds merged updates), the loop's counters, and for
resuming the optimizer, the LR schedule and the RNGs. Written atomically, so a crash leaves the
last good checkpoint.

Under FSDP2 (``launch/fsdp.yaml``) every process holds a shard of each parameter and of its Adam
moments (DTensors): saving gathers each into the whole tensor on the process that writes, and
loading cuts each back into this process's shard. The file is the same with or without sharding,
so a run saved under FSDP resumes on one GPU, is evaluated by ``experiments/eval.py`` and gives
the ΔW spectra, and the other way round.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from experiments.files import atomic_torch_save
from experiments.loop.records import process_rank
from mora.adapters import AdapterConfig, adapter_state_dict, load_adapter_state_dict

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, model: nn.Module, adapter: AdapterConfig, optimizer, scheduler, loop: dict) -> None:
    """Write the trained tensors, the loop counters ``loop``, optimizer, schedule and RNGs to ``path``.

    Every process of a distributed run calls it (gathering FSDP shards takes all of them); global
    rank 0 alone writes.
    """
    writes = process_rank() == 0
    weights = _gathered(adapter_state_dict(model, adapter), writes)
    optimizer_state = _gathered(optimizer.state_dict(), writes)
    if writes:
        atomic_torch_save({"loop": loop, "weights": weights, "optimizer": optimizer_state,
                           "scheduler": scheduler.state_dict(), "rng": _rng_state()}, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer=None, scheduler=None) -> dict:
    """Load the trained tensors into ``model`` (with adapters injected); returns the loop counters.

    Resuming passes ``optimizer`` and ``scheduler``: their state and the RNGs are restored too.
    """
    try:
        # mmap: under FSDP every process reads the whole file, so its pages are shared, not copied per process
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err) from err
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    load_adapter_state_dict(model, {k: _shard_like(t, own.get(k)) for k, t in ckpt["weights"].items()})
    if optimizer is not None:
        optimizer.load_state_dict(_sharded_optimizer_state(ckpt["optimizer"], optimizer))
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


def _gathered(tree, keep: bool):
    """``tree`` (a state dict, nested) with every DTensor replaced by the whole tensor on the CPU,
    or by None where not ``keep``. Collective: every process walks the same tree in the same order."""
    if isinstance(tree, dict):
        return {k: _gathered(v, keep) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_gathered(v, keep) for v in tree)
    if isinstance(tree, DTensor):
        whole = tree.full_tensor()  # an all-gather, one tensor at a time: no process holds the whole state
        return whole.cpu() if keep else None
    return tree


def _shard_like(tensor: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
    """The whole ``tensor`` cut as this process's shard of ``own`` when ``own`` is a DTensor of its
    shape; else ``tensor`` itself."""
    if not isinstance(own, DTensor) or tensor.shape != own.shape:
        return tensor
    # src_data_rank=None: each process read the whole tensor, so it takes its own shard, no communication
    return distribute_tensor(tensor.to(own.device), own.device_mesh, own.placements, src_data_rank=None)


def _sharded_optimizer_state(state: dict, optimizer) -> dict:
    """The saved optimizer state with each parameter's moments cut as that parameter is sharded
    (the state is keyed by parameter index, in the order of the param groups)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    indices = [i for group in state["param_groups"] for i in group["params"]]
    owner = dict(zip(indices, params, strict=True))
    per_param = {i: {k: _shard_like(v, owner[i]) if torch.is_tensor(v) else v for k, v in values.items()}
                 for i, values in state["state"].items()}
    return state | {"state": per_param}


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
