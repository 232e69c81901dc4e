"""Print one value of the composed config (a list comma-joined), for the Makefile:

    python experiments/config_value.py task.n_pairs task=uuid          # -> the UUID mini preset's pairs

The value is read from the same composition ``experiments/run.py <overrides>`` gets, so the Makefile
never repeats a number the presets hold. A key that is not there is an error naming it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python experiments/<script>.py` from a checkout: the repository root on the path instead of this folder
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from experiments.schema import compose_config  # noqa: E402


def config_value(key: str, overrides: list[str]):
    from omegaconf import OmegaConf

    cfg = compose_config(overrides)
    value = OmegaConf.select(cfg, key, default=KeyError)
    if value is KeyError:
        raise KeyError(f"{key} is not in the composed config (overrides: {' '.join(overrides) or 'none'})")
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python experiments/config_value.py KEY [override ...]")
    try:
        found = config_value(sys.argv[1], sys.argv[2:])
    except KeyError as error:
        sys.exit(f"config_value: {error.args[0]}")
    print(",".join(map(str, found)) if isinstance(found, list) else found)
