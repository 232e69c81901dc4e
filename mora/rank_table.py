"""Print MoRA's r̂ per LLaMA-2-7B module type at each rank (README table): ``python -m mora.rank_table``.

Computed, not typed in: r̂ from :func:`mora.budget.mora_r_hat` and the parameter ratio to LoRA.
"""

from __future__ import annotations

import argparse

from .budget import lora_parameter_count, mora_r_hat

# LLaMA-2-7B: hidden 4096, intermediate 11008, no GQA. (in_features k, out_features d)
LLAMA2_7B_MODULES = {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (4096, 11008), "down_proj": (11008, 4096)}
PAPER_RANKS = (8, 16, 32, 64, 128, 256)


def rank_table_rows(modules=LLAMA2_7B_MODULES, ranks=PAPER_RANKS) -> list[dict]:
    rows = []
    for rank in ranks:
        for name, (k, d) in modules.items():
            lora = lora_parameter_count(k, d, rank)
            r_hat = {key: mora_r_hat(k, d, rank, rounding, even)
                     for key, rounding, even in (("nearest", "nearest", False), ("floor", "floor", False),
                                                 ("rotate", "nearest", True))}
            rows.append(dict(rank=rank, module=name, k=k, d=d, lora_params=lora, **{
                f"r_hat_{key}": v for key, v in r_hat.items()}, **{
                f"ratio_{key}": v * v / lora for key, v in r_hat.items()}))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| r | module (k→d) | LoRA params | r̂ nearest (ratio) | r̂ floor (ratio) | r̂ rotate (ratio) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[f'r_hat_{key}']} ({r[f'ratio_{key}']:.4f})" for key in ("nearest", "floor", "rotate")]
        lines.append(f"| {r['rank']} | {r['module']} ({r['k']}→{r['d']}) | {r['lora_params']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    print(markdown(rank_table_rows()))


if __name__ == "__main__":
    main()
