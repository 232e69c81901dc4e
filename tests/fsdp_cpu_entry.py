"""The real training loop under accelerate's FSDP2 on CPU processes, for tests/test_sharded_checkpoints.py:

    accelerate launch --config_file launch/fsdp.yaml --num_processes 2 --mixed_precision no \\
        tests/fsdp_cpu_entry.py <dump_dir> <stop_step> "<hydra overrides of run 0>" "<of run 1>" ...

accelerate 1.15 shards with FSDP only on an accelerator: on CPU processes it takes its MULTI_CPU
(DDP) route and ignores the FSDP plugin. So two of its methods are replaced here, and only here:
the backend choice (gloo, on the FSDP route) and the device (the CPU); and the gloo process group
is started here, as accelerate starts it for CPU processes only on its MULTI_CPU route. The rest
of accelerate, torch's FSDP2 and ``experiments/run.py`` run unchanged.

Each run, one after the other in the same processes (one launch: the imports are most of its
time), is interrupted right after its checkpoint of step ``stop_step`` (an exception in every
process, once that checkpoint is on disk), then run again with ``resume=true``, as a restarted job
would. At the end of run i each process writes, to ``<dump_dir>/rank<RANK>-run<i>.json``, the
distributed type accelerate used and, per parameter, its whole and its local (shard) shape.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from hydra import compose, initialize_config_dir
from torch.distributed.tensor import DTensor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import experiments.loop.training as training  # noqa: E402
import experiments.run as run  # noqa: E402


class Interrupted(RuntimeError):
    """Raised in every process after the checkpoint of the stop step."""


def fsdp_on_cpu() -> None:
    """accelerate's FSDP route with gloo on CPU processes (see the module docstring)."""
    PartialState._prepare_backend = lambda self, *args, **kwargs: ("gloo", DistributedType.MULTI_GPU)

    def set_device(self):
        self.device = torch.device("cpu")

    PartialState.set_device = set_device
    torch.distributed.init_process_group("gloo")  # from the launcher's RANK, WORLD_SIZE, MASTER_ADDR/PORT


def stopping_after(save, stop_step: int):
    """``save_checkpoint`` that raises Interrupted once the checkpoint of ``stop_step`` is written."""
    def save_then_stop(path, model, adapter, optimizer, scheduler, loop: dict) -> None:
        save(path, model, adapter, optimizer, scheduler, loop)
        if loop["step"] == stop_step:
            torch.distributed.barrier()  # rank 0 has written the file
            raise Interrupted(f"after the checkpoint of step {stop_step}")
    return save_then_stop


def dumping(train, dump: Path):
    """``train`` that then writes how accelerate sharded the model to ``dump``."""
    def train_and_dump(model, *args, **kwargs):
        final = train(model, *args, **kwargs)
        shapes = {n: [list(p.shape), list(p.to_local().shape) if isinstance(p, DTensor) else None]
                  for n, p in model.named_parameters()}
        dump.write_text(json.dumps({"distributed_type": str(PartialState().distributed_type), "shapes": shapes}))
        return final
    return train_and_dump


def main(dump_dir: Path, stop_step: int, runs: list[str]) -> None:
    fsdp_on_cpu()
    train = run.train
    training.save_checkpoint = stopping_after(training.save_checkpoint, stop_step)  # looked up at every save
    for index, overrides in enumerate(runs):
        run.train = dumping(train, dump_dir / f"rank{os.environ['RANK']}-run{index}.json")
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            try:
                run.execute(compose("config", overrides=overrides.split()))
                raise AssertionError(f"run {index} was not interrupted at step {stop_step}")
            except Interrupted:
                pass
            summary = run.execute(compose("config", overrides=[*overrides.split(), "resume=true"]))
        assert summary["status"] == "completed", summary


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
