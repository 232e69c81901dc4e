"""Every Markdown table in the README has as many cells in each row as in its header: a row edited with a
neighbouring table's cells glued on (as happened twice, a claims row carrying a make-target row's timing) fails."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line.strip())) - 2     # leading and trailing pipes; \| stays inside a cell


def test_every_readme_table_row_has_its_headers_cell_count():
    lines, bad, header = README.read_text().splitlines(), [], None
    for number, line in enumerate(lines, 1):
        if not line.startswith("|"):
            header = None
            continue
        if header is None:
            header = (number, _cells(line))
        elif _cells(line) != header[1]:
            bad.append(f"README.md:{number}: {_cells(line)} cells, its header (line {header[0]}) {header[1]}")
    assert not bad, "\n".join(bad)
