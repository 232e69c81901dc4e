"""``experiments/run.py`` as a distributed launcher runs it, plus one thing a test needs to see:
each rank's trainable parameters when training ends, in ``<dump_dir>/rank<RANK>.pt``.

    accelerate launch ... tests/distributed_entry.py <dump_dir> <hydra overrides>

Nothing else differs from the entry point: the real ``train`` runs, and is only wrapped so the
parameters it leaves behind are saved (rank 0 writes the run folder; every rank writes its dump).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import experiments.run as run  # noqa: E402

DUMP_DIR = Path(sys.argv.pop(1))  # before Hydra reads the overrides
_train = run.train


def train_and_dump(model, *args, **kwargs):
    final = _train(model, *args, **kwargs)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(params, DUMP_DIR / f"rank{os.environ.get('RANK', '0')}.pt")
    return final


@hydra.main(config_path=str(REPO / "conf"), config_name="config", version_base="1.3")
def main(cfg) -> None:
    """``experiments/run.py``'s main (Hydra resolves a relative config path from the importer)."""
    run.train = train_and_dump
    run.main.__wrapped__(cfg)


if __name__ == "__main__":
    main()
