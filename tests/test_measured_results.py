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
        ("| FFT | – | 0.003 | 93.6 ± 3.0 (3) [paper 42.5] | 99.6 ± 0.7 (3) [paper 100] | 100.0 ± 0.0 (3) [paper 100] | "
         "100.0 ± 0.0 (3)", "| FFT | – | 0.003 | 93.6 ± 3.0 | 99.6 ± 0.7 | 100.0 ± 0.0 | 100.0 ± 0.0 |"),
        ("| LoRA | 8 (mini 1) | 0.01 | 17.6 ± 2.6 (3) [paper 9.9] | 27.4 ± 5.9 (3) [paper 10] | 42.2 ± 10.9 (3) "
         "[paper 10.7] | 51.1 ± 19.3 (3)", "| LoRA | 8 (1) | 0.01 | 17.6 ± 2.6 | 27.4 ± 5.9 | 42.2 ± 10.9 | 51.1 ± 19.3 |"),
        ("| MoRA | 8 (mini 1) | 0.005 | 28.0 ± 1.2 (3) [paper 10.1] | 40.5 ± 5.8 (3) [paper 15.7] | 58.6 ± 8.2 (3) "
         "[paper 87.4] | 82.4 ± 5.0 (3)", "| MoRA | 8 (1) | 0.005 | 28.0 ± 1.2 | 40.5 ± 5.8 | 58.6 ± 8.2 | **82.4 ± 5.0** |"),
        ("| LoRA | 256 (mini 8) | 0.003 | 24.5 ± 0.2 (3) [paper 9.9] | 63.3 ± 2.5 (3) [paper 70.6] | 97.6 ± 1.3 (3) "
         "[paper 100] | 100.0 ± 0.0 (3)", "| LoRA | 256 (8) | 0.003 | 24.5 ± 0.2 | 63.3 ± 2.5 | 97.6 ± 1.3 | 100.0 ± 0.0 |"),
        ("| MoRA | 256 (mini 8) | 0.005 | 53.9 ± 6.3 (3) [paper 41.6] | 96.5 ± 2.5 (3) [paper 100] | 100.0 ± 0.0 (3) "
         "[paper 100] | 100.0 ± 0.0 (3)", "| MoRA | 256 (8) | 0.005 | **53.9 ± 6.3** | **96.5 ± 2.5** | **100.0 ± 0.0** | 100.0 ± 0.0 |"),
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


def test_the_capacity_starved_table_is_what_its_runs_give():
    """The README keeps the first preset's Table 2 (128 pairs on width 64, one rate per method) as the
    capacity-starved row: its numbers must still be what tests/fixtures/uuid_capacity_starved gives."""
    from analysis.runs import load_runs
    from analysis.uuid_figures import table2_markdown

    rendered = table2_markdown(load_runs(REPO / "tests" / "fixtures" / "uuid_capacity_starved", task="uuid"))
    for row in ("| LoRA | 256 (mini 4) | 0.01 | 20.4 ± 0.2 (3) [paper 9.9] | 21.1 ± 1.1 (3) [paper 70.6] | 24.1 ± 0.8 (3) "
                "[paper 100] | 26.6 ± 1.1 (3)",
                "| MoRA | 256 (mini 4) | 0.01 | 19.3 ± 0.8 (3) [paper 41.6] | 23.3 ± 0.2 (3) [paper 100] | 28.9 ± 0.5 (3) "
                "[paper 100] | 34.2 ± 2.2 (3)"):
        assert row in rendered
    assert "| LoRA r = 256 (mini r = 4) | 20.4 ± 0.2 | 21.1 ± 1.1 | 24.1 ± 0.8 | 26.6 ± 1.1 |" in README
    assert "| MoRA r = 256 (mini r = 4) | 19.3 ± 0.8 | 23.3 ± 0.2 | 28.9 ± 0.5 | 34.2 ± 2.2 |" in README


def test_every_notebook_is_checked_against_the_snapshot():
    assert {p.stem for p in (REPO / "notebooks").glob("*.ipynb")} == set(QUOTED)


def test_the_claims_table_quotes_only_measured_numbers():
    """The opening claims table's fine-tuning numbers (three decimals) are the fine-tuning section's."""
    start = README.index("## The paper's claims")
    claims = README[start:README.index("\n## ", start)]
    section = finetuning_section()
    for number in re.findall(r"\b\d\.\d{3}\b", claims):
        assert number in section, f"claims table quotes {number}, which the fine-tuning results do not show"
