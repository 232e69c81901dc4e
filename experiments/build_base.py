"""Pretrain a base the repository builds itself (``model.source: local_base``) and cache it:

    python experiments/build_base.py --model stories_w128      # what `make base` runs

A run that needs the base builds it on first use anyway; this builds it ahead (e.g. before a
parallel sweep) and prints where it is and what its pretraining reached. Nothing is downloaded:
the corpus and tokenizer come from the offline data folder. See experiments/models/local_base.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# `python experiments/<script>.py` from a checkout: the repository root on the path instead of this folder
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from experiments.models.local_base import MANIFEST, build_base  # noqa: E402
from experiments.paths import DEFAULT_DATA_ROOT  # noqa: E402
from experiments.schema import model_spec  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stories_w128", help="conf/model/<name>.yaml with source: local_base")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="offline data folder (SHA256SUMS inside)")
    args = parser.parse_args(argv)
    spec = model_spec(args.model)
    if spec.source != "local_base":
        parser.error(f"--model {args.model} has model.source={spec.source!r}; only source: local_base bases are built here")
    folder = build_base(spec, args.data_root)
    manifest = json.loads((folder / MANIFEST).read_text())
    print(f"{folder}: {manifest['parameters']:,} parameters, {manifest['train_tokens_seen']:,} tokens seen, "
          f"validation loss {manifest['validation_loss_before']:.3f} -> {manifest['validation_loss_after']:.3f}, "
          f"built in {manifest['seconds']:.0f} s on {manifest['recipe']['threads']} threads")
    return folder


if __name__ == "__main__":
    main()
