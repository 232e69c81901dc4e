"""The `paper` presets against the paper's settings (analysis/paper_settings.py): every row agrees,
the README block and docs/paper_settings.md are the freshly generated table, and a wrong expectation
is caught (so these tests can fail). Composing only: no model, no data."""

from __future__ import annotations

from dataclasses import replace

import pytest

from analysis.paper_settings import (BEGIN, DOC, END, README, SETTINGS, Setting, block, check, check_one,
                                     document, epochs, llama_size, main, problems, readme_block, with_block)


@pytest.fixture(scope="module")
def rows():
    return check()


@pytest.mark.parametrize("setting", SETTINGS, ids=[f"{s.where}: {s.what}"[:80] for s in SETTINGS])
def test_preset_agrees_with_the_paper(setting):
    row = check_one(setting)
    assert row.agrees, row.describe()


def test_every_section_of_the_brief_is_covered():
    where = {s.where for s in SETTINGS}
    assert where >= {"Section 3", "Section 5.1", "Section 5.2", "Table 5", "Section 5.3", "Appendix B"}
    tasks = {o.split("=")[1] for s in SETTINGS if s.where == "Table 5" for o in s.overrides if o.startswith("task=")}
    assert tasks == {"tulu", "metamath", "biomed", "finance"}


def test_readme_block_is_the_generated_table(rows):
    assert readme_block(README.read_text()) == block(rows), \
        "README is stale: python -m analysis.paper_settings --readme README.md"


def test_doc_is_the_generated_table(rows):
    assert DOC.read_text() == document(rows), "stale: python -m analysis.paper_settings --write docs/paper_settings.md"


def test_a_wrong_expectation_is_flagged():
    epochs_row = next(s for s in SETTINGS if s.what == "UUID: epochs")
    wrong = check_one(replace(epochs_row, paper=99))
    assert not wrong.agrees
    assert "UUID: epochs" in wrong.describe() and "paper 99" in wrong.describe() and "→ 100" in wrong.describe()
    assert any("UUID: epochs" in p for p in problems([wrong], readme=None, doc=None))


def test_a_value_outside_a_searched_grid_is_flagged():
    merge = next(s for s in SETTINGS if s.what.startswith("metamath: ReLoRA merge steps"))
    assert check_one(merge).agrees
    assert not check_one(replace(merge, paper=frozenset({2000, 4000}))).agrees


def test_a_missing_key_is_a_disagreement_not_a_crash():
    row = check_one(Setting("Section 3", "no such key", 1, ("task=uuid", "scale=paper"), ("train.no_such_key",)))
    assert not row.agrees and "(absent)" in row.describe()


def test_derivations():
    assert epochs(5094, 16, 8, 326_000) == 2          # 2 × 326k / 128 = 5,093.75 steps, rounded up
    assert epochs(9258, 16, 8, 395_000) == 3
    assert epochs(4000, 16, 8, 326_000) == pytest.approx(4000 * 128 / 326_000)   # not a whole epoch
    assert llama_size(768, 2560, 24) == "250M" and llama_size(2048, 5461, 24) == "1.3B"


def test_readme_rewrite_touches_only_the_block(tmp_path, rows):
    text = "# title\n\nbefore\n"
    appended = with_block(text, block(rows))
    assert appended.startswith(text.rstrip("\n")) and appended.count(BEGIN) == 1 and appended.count(END) == 1
    stale = appended.replace("✓", "✗", 1) + "\nafter\n"
    fresh = with_block(stale, block(rows))
    assert fresh == appended + "\nafter\n"


def test_check_cli(tmp_path, capsys):
    assert main(["--check"]) == 0
    readme, doc = tmp_path / "README.md", tmp_path / "doc.md"
    readme.write_text(f"# x\n\n{BEGIN}\nold\n{END}\n")
    assert main(["--write", str(doc)]) == 0
    assert main(["--check", "--readme", str(readme), "--write", str(doc)]) == 1
    assert "stale" in capsys.readouterr().out
    assert main(["--readme", str(readme)]) == 0
    assert main(["--check", "--readme", str(readme), "--write", str(doc)]) == 0
