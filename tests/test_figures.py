"""The README's figures (docs/figures/, written by ``make figures``) are what the saved runs draw: each is
drawn again from tests/fixtures/measured/ and compared, decoded pixel by pixel, with the committed PNG.
docs/figures/ holds nothing else, and the README shows every one. Drawing is bit-stable with the pinned
matplotlib, so the comparison is exact: runs re-saved, or a figure's code changed, without re-rendering fail."""

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from analysis.__main__ import main as cli_main
from analysis.readme_figures import README_FIGURES, write_readme_figures

REPO = Path(__file__).resolve().parent.parent
FIGURES = REPO / "docs" / "figures"
MEASURED = REPO / "tests" / "fixtures" / "measured"
REDRAW = "run `make figures` (it redraws docs/figures/ from tests/fixtures/measured/) and commit the PNGs"


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("figures")
    written, skipped, _ = write_readme_figures(MEASURED, out)
    assert not skipped, f"the saved runs no longer draw: {skipped}"
    return out


@pytest.mark.parametrize("stem", sorted(README_FIGURES))
def test_the_committed_figure_is_what_the_saved_runs_draw(drawn, stem):
    committed = FIGURES / f"{stem}.png"
    assert committed.is_file(), f"docs/figures/{stem}.png is missing: {REDRAW}"
    new, old = imread(drawn / f"{stem}.png"), imread(committed)
    assert new.shape == old.shape, f"docs/figures/{stem}.png is stale ({old.shape} vs {new.shape} drawn): {REDRAW}"
    differing = int(np.any(new != old, axis=-1).sum())
    assert differing == 0, f"docs/figures/{stem}.png is stale ({differing} pixels differ): {REDRAW}"


def test_docs_figures_holds_only_drawn_figures():
    stray = sorted(p.name for p in FIGURES.iterdir() if p.suffix != ".png" or p.stem not in README_FIGURES)
    assert not stray, f"docs/figures/ holds files `make figures` does not draw: {stray}; delete them"


def test_the_readme_shows_every_figure():
    readme = (REPO / "README.md").read_text()
    missing = [stem for stem in README_FIGURES if f"](docs/figures/{stem}.png)" not in readme]
    assert not missing, f"README.md does not show docs/figures/{{{', '.join(missing)}}}.png"


def test_cli_skips_what_the_runs_cannot_draw(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    written, skipped, n_runs = write_readme_figures(tmp_path / "runs", tmp_path / "out")
    assert (written, n_runs) == ([], 0) and [s.split(":")[0] for s in skipped] == [f"{s}.png" for s in README_FIGURES]
    assert cli_main(["figures", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 1
    assert "no runs" in capsys.readouterr().err
