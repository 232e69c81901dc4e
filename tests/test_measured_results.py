"""The README's measured numbers come from the run folders saved in tests/fixtures/measured/ (``make
snapshot`` copies them from results/runs, checkpoints left out): every notebook re-renders its tables
and figures from that snapshot without training, and each number the README quotes must appear in
both the notebook's output and the README. A README edited by hand away from the data, or data re-run
without updating the README, fails here."""

import re
from pathlib import Path

import pytest

from tests.conftest import execute_notebook

REPO = Path(__file__).resolve().parent.parent
MEASURED = REPO / "tests" / "fixtures" / "measured"
README = (REPO / "README.md").read_text()

# notebook → [(text the notebook renders from the snapshot, the same number as the README quotes it)]
QUOTED = {
    "uuid_memorization": [
        ("| FFT | – | 0.003 | 20.1 ± 2.3 (3) [paper 42.5] | 37.0 ± 3.7 (3) [paper 100] | 96.0 ± 2.8 (3) [paper 100] | "
         "100.0 ± 0.0 (3)", "| FFT | – | 20.1 ± 2.3 | 37.0 ± 3.7 | 96.0 ± 2.8 | **100.0 ± 0.0** |"),
        ("| LoRA | 8 (mini 1) | 0.01 | 14.8 ± 8.2 (3) [paper 9.9] | 21.1 ± 0.6 (3) [paper 10] | 22.2 ± 1.2 (3) "
         "[paper 10.7] | 23.1 ± 0.6 (3)", "| LoRA | 8 (1) | 14.8 ± 8.2 | 21.1 ± 0.6 | 22.2 ± 1.2 | 23.1 ± 0.6 |"),
        ("| MoRA | 8 (mini 1) | 0.01 | 13.4 ± 5.4 (3) [paper 10.1] | 20.6 ± 0.4 (3) [paper 15.7] | 22.8 ± 0.9 (3) "
         "[paper 87.4] | 24.2 ± 1.1 (3)", "| MoRA | 8 (1) | 13.4 ± 5.4 | 20.6 ± 0.4 | 22.8 ± 0.9 | 24.2 ± 1.1 |"),
        ("| LoRA | 256 (mini 4) | 0.01 | 20.4 ± 0.2 (3) [paper 9.9] | 21.1 ± 1.1 (3) [paper 70.6] | 24.1 ± 0.8 (3) "
         "[paper 100] | 26.6 ± 1.1 (3)", "| LoRA | 256 (4) | 20.4 ± 0.2 | 21.1 ± 1.1 | 24.1 ± 0.8 | 26.6 ± 1.1 |"),
        ("| MoRA | 256 (mini 4) | 0.01 | 19.3 ± 0.8 (3) [paper 41.6] | 23.3 ± 0.2 (3) [paper 100] | 28.9 ± 0.5 (3) "
         "[paper 100] | 34.2 ± 2.2 (3)", "| MoRA | 256 (4) | 19.3 ± 0.8 | 23.3 ± 0.2 | 28.9 ± 0.5 | **34.2 ± 2.2** |"),
        ("| lora r128 | **0.01** | 25.2 ± 0.6 (3)", "| LoRA | 128 (2) | 19.5 ± 0.6 | 21.7 ± 0.4 | 23.9 ± 0.2 | 25.2 ± 0.6 |"),
    ],
    "pretraining": [
        ("| LoRA | 128 (mini 21) | 0.003 | 122.70 ± 10.43 (3) |", "| LoRA | **122.7 ± 10.4** |"),
        ("| MoRA | 128 (mini 21) | 0.003 | 167.28 ± 9.88 (3) |", "| MoRA | 167.3 ± 9.9 |"),
        ("| ReLoRA | 128 (mini 21) | 0.001 | 205.18 ± 3.13 (3) |", "| ReLoRA | 205.2 ± 3.1 |"),
        ("| ReMoRA | 128 (mini 21) | 0.003 | 161.18 ± 9.09 (3) |", "| ReMoRA | 161.2 ± 9.1 |"),
        ("| FFT | – | 0.003 | 143.95 ± 8.64 (3) |", "| FFT | 143.9 ± 8.6 |"),
    ],
}



def finetuning_section() -> str:
    start = README.index("### Fine-tuning (Section 5.2")
    return README[start:README.index("\n## ", start)]


def finetuning_quotes() -> list[tuple[str, str]]:
    """Every "mean ± std" the README's fine-tuning tables quote must be a cell of the rendered tables
    ("mean ± std (3)": three seeds)."""
    table_lines = [line for line in finetuning_section().splitlines() if line.startswith("| ")]
    stats = re.findall(r"\d+\.\d+ ± \d+\.\d+", "\n".join(table_lines))
    assert len(stats) >= 50, "the README's fine-tuning tables are missing"
    return [(f"{stat} (3)", stat) for stat in stats]


QUOTED["finetuning"] = finetuning_quotes()


@pytest.mark.parametrize("notebook", sorted(QUOTED))
def test_notebook_rerenders_the_readme_numbers_from_the_saved_runs(notebook):
    outputs = execute_notebook(REPO / "notebooks" / f"{notebook}.ipynb", MEASURED, timeout=300)
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure drawn"
    rendered = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    for from_runs, in_readme in QUOTED[notebook]:
        assert from_runs in rendered, f"the saved runs no longer give: {from_runs}"
        assert in_readme in README, f"the README no longer quotes: {in_readme}"


def test_every_notebook_is_checked_against_the_snapshot():
    assert {p.stem for p in (REPO / "notebooks").glob("*.ipynb")} == set(QUOTED)


def test_the_claims_table_quotes_only_measured_numbers():
    """The opening claims table's fine-tuning numbers (three decimals) are the fine-tuning section's."""
    start = README.index("## The paper's claims")
    claims = README[start:README.index("\n## ", start)]
    section = finetuning_section()
    for number in re.findall(r"\b\d\.\d{3}\b", claims):
        assert number in section, f"claims table quotes {number}, which the fine-tuning results do not show"
