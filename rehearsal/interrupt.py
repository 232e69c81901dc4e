"""``python -m rehearsal.interrupt <step> <experiments/run.py overrides...>``: the entry point, killed.

Runs ``experiments/run.py``'s ``main`` unchanged, except that the process ends at once
(``os._exit``, no clean-up, as a SIGKILL or a lost node would end it) right after the checkpoint of
optimizer step ``<step>`` is written. The rehearsal then resumes the run with ``resume=true``
through the plain entry point and compares it with an uninterrupted one.
"""

from __future__ import annotations

import os
import runpy
import sys

KILLED = 75  # the exit code of the simulated kill (not one the entry point uses)


def main(argv: list[str]) -> None:
    step, overrides = int(argv[0]), argv[1:]
    import experiments.loop.training as training
    from experiments.paths import REPO_ROOT

    save = training.save_checkpoint

    def save_then_die(path, model, adapter, optimizer, scheduler, loop: dict) -> None:
        save(path, model, adapter, optimizer, scheduler, loop)
        if loop["step"] >= step:
            print(f"[killed] after the checkpoint of step {loop['step']}", flush=True)
            os._exit(KILLED)

    training.save_checkpoint = save_then_die  # the loop looks it up in its module at every save
    script = str(REPO_ROOT / "experiments" / "run.py")
    sys.argv = [script, *overrides]
    runpy.run_path(script, run_name="__main__")  # as `python experiments/run.py`: Hydra finds conf/ beside it


if __name__ == "__main__":
    main(sys.argv[1:])
