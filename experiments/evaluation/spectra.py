"""Singular values of the learned update ΔW = W_final − W_init (paper Fig. 5, Section 6.1).

The paper follows ReLoRA (Lialin et al. 2023): per layer, the SVD in float32 of ΔW, then the
number of singular values above 0.1, averaged over layers for each module type (q, k, v, o, up,
down, gate). A run snapshots :func:`effective_linear_weights` before training and again at the end;
:func:`delta_spectra` turns the two into singular values, saved as ``spectra.safetensors`` in the
run folder; analysis counts them with :func:`count_above`.

"Effective" means the weight the layer applies right now, pending (unmerged) adapters included, so
the same code measures FFT, LoRA/ReLoRA (peft layers) and MoRA/ReMoRA (``mora.layer.MoRALinear``),
whatever has or has not been merged into W0 so far.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from experiments.files import atomic_write_bytes
from mora.adapters import LLAMA_TARGETS, adapter_layers, effective_weight

SPECTRA_FILE = "spectra.safetensors"
# The module types in the order of the paper's Fig. 5: ΔW_q, ΔW_k, ΔW_v, ΔW_o, ΔW_up, ΔW_down, ΔW_gate.
FIG5_MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")
_WRAPPED = ".base_layer"  # peft's and MoRALinear's name for the wrapped nn.Linear


def normalise_name(name: str) -> str:
    """The module name a layer had before adapter injection: ``…q_proj.base_layer`` → ``…q_proj``."""
    return name.replace(_WRAPPED + ".", ".").removesuffix(_WRAPPED)


def module_type(name: str) -> str:
    """The leaf of a module name: ``model.layers.3.self_attn.q_proj`` → ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


@torch.no_grad()
def effective_linear_weights(model: nn.Module, target_modules: tuple[str, ...] = LLAMA_TARGETS,
                             device: str | torch.device | None = "cpu") -> dict[str, torch.Tensor]:
    """name → float32 copy of the (d, k) weight each targeted linear currently applies.

    A layer matches when its name ends with one of ``target_modules`` (peft's suffix rule). Pending
    adapters are included (:func:`mora.adapters.effective_weight`); a plain ``nn.Linear`` (FFT)
    gives its weight. Names are those before
    adapter injection, so snapshots taken before and after injection share keys. Biases are not
    included (they are not part of ΔW). ``device``: where the copies go (None: stay where they are).
    Raises ValueError when nothing matches.
    """
    adapters = adapter_layers(model)
    weights: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        key = normalise_name(name)
        if not _matches(key, tuple(target_modules)) or key in weights:
            continue
        if name not in adapters and not isinstance(module, nn.Linear):
            continue
        weight = effective_weight(module)
        weights[key] = weight if device is None else weight.to(device)
    if not weights:  # e.g. FFT's empty adapter target list passed by mistake: fail, never save nothing
        raise ValueError(f"no linear layer matches target_modules={tuple(target_modules)}")
    return weights


# ---------------------------------------------------------------- spectra


@torch.no_grad()
def delta_spectra(initial: dict[str, torch.Tensor], final: dict[str, torch.Tensor],
                  device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """name → singular values (float32, descending, length min(d, k)) of final − initial.

    The SVD runs in float32 on ``device`` (None: where the tensors are); results come back on the
    CPU. Raises KeyError if the two snapshots do not name the same modules, ValueError on a shape
    mismatch.
    """
    if initial.keys() != final.keys():
        missing = sorted(initial.keys() ^ final.keys())
        raise KeyError(f"initial and final weights name different modules: {missing[:5]}")
    spectra = {}
    for name in initial:
        if initial[name].shape != final[name].shape:
            raise ValueError(f"{name}: shape {tuple(initial[name].shape)} != {tuple(final[name].shape)}")
        delta = final[name].to(device, torch.float32) - initial[name].to(device, torch.float32)  # (d, k)
        spectra[name] = torch.linalg.svdvals(delta).cpu()  # (min(d, k),), descending
    return spectra


def _spectra_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/spectra.safetensors`` when ``path`` is a folder (a run folder)."""
    path = Path(path)
    return path / SPECTRA_FILE if path.is_dir() else path


def save_spectra(path: str | Path, spectra: dict[str, torch.Tensor]) -> Path:
    """Write ``spectra`` as float32 safetensors, atomically; ``path`` is a file or a run folder."""
    path = _spectra_path(path)
    tensors = {name: s.detach().to("cpu", torch.float32).contiguous() for name, s in spectra.items()}
    atomic_write_bytes(path, save(tensors, metadata={"content": "singular values of W_final - W_init"}))
    return path


def load_spectra(path: str | Path) -> dict[str, torch.Tensor]:
    """What :func:`save_spectra` wrote; ``path`` is the file or the run folder holding it."""
    return load_file(str(_spectra_path(path)))


def count_above(spectra: dict[str, torch.Tensor], threshold: float = 0.1) -> dict[str, float]:
    """module type → number of singular values > ``threshold``, averaged over layers (ReLoRA's
    measure, paper Fig. 5); the types in the paper's order, then any others alphabetically."""
    counts: dict[str, list[int]] = {}
    for name, values in spectra.items():
        counts.setdefault(module_type(name), []).append(int((values > threshold).sum()))
    order = [t for t in FIG5_MODULE_TYPES if t in counts] + sorted(set(counts) - set(FIG5_MODULE_TYPES))
    return {t: sum(counts[t]) / len(counts[t]) for t in order}
