"""The offline data ships with the repository (data/): every listed file is present and intact,
every file the configs and loaders name is listed and described, and the default data root is
inside the checkout, so a clone alone runs the `mini` experiments and the tests."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from experiments.data.finetune import ALPACA_FILE, GSM8K_FILES, PUBMEDQA_FILE
from experiments.data.offline import SUMS_FILE, read_checksums, verify_files
from experiments.models.loading import STORIES260K
from experiments.paths import DEFAULT_DATA_ROOT, REPO_ROOT
from experiments.tasks.c4 import C4TaskSpec

DATA = REPO_ROOT / "data"
# a config string naming a file under data_root: relative, with one of the data files' suffixes
# (hub ids such as meta-llama/Llama-2-7b-hf have none)
DATA_FILE = re.compile(r"^[\w.-]+(/[\w.-]+)+\.(bin|model|json|jsonl|gz|txt|raw)$")


@pytest.fixture(scope="module")
def listed() -> dict[str, str]:
    return read_checksums(DATA)


def config_data_files() -> set[str]:
    """Every string in conf/**/*.yaml that names a file under data_root."""
    found = set()
    for path in sorted((REPO_ROOT / "conf").rglob("*.yaml")):
        leaves = [OmegaConf.to_container(OmegaConf.load(path), resolve=False)]
        while leaves:
            value = leaves.pop()
            if isinstance(value, dict):
                leaves.extend(value.values())
            elif isinstance(value, list):
                leaves.extend(value)
            elif isinstance(value, str) and DATA_FILE.match(value):
                found.add(value)
    return found


def test_the_default_data_root_is_the_repositorys_data_folder():
    assert DEFAULT_DATA_ROOT.resolve() == DATA.resolve()
    assert DEFAULT_DATA_ROOT.resolve().is_relative_to(REPO_ROOT.resolve())


def test_every_listed_file_is_present_and_matches_its_checksum(listed):
    assert len(listed) >= 10
    assert verify_files(DATA, listed) == [DATA.resolve() / rel for rel in listed]


def test_every_shipped_file_is_listed(listed):
    shipped = {str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file()}
    assert shipped - set(listed) == {SUMS_FILE, "README.md"}


def test_every_file_the_configs_name_is_listed(listed):
    named = config_data_files()
    # the walk must see the model files, the C4 splits and stories_w128's pretraining corpus
    corpus = OmegaConf.load(REPO_ROOT / "conf/model/stories_w128.yaml").pretrain.corpus
    assert set(STORIES260K) | set(corpus) | {"c4/c4-sample.01.json.gz"} <= named
    assert sorted(named - set(listed)) == []


def test_every_file_the_loaders_name_by_default_is_listed(listed):
    c4 = C4TaskSpec()
    defaults = {*STORIES260K, *GSM8K_FILES.values(), ALPACA_FILE, PUBMEDQA_FILE,
                *c4.train_files, *c4.validation_files,
                "tokenizers/t5_spiece.model"}  # t5-base offline, in tests/test_c4_task.py
    assert sorted(defaults - set(listed)) == []


def test_the_data_readme_describes_every_listed_file(listed):
    readme = (DATA / "README.md").read_text()
    assert [rel for rel in listed if f"`{rel}`" not in readme] == []
    assert "licence" in readme.lower() and "unmodified" in readme


def test_the_sums_file_has_sha256sums_format():
    for line in (DATA / SUMS_FILE).read_text().splitlines():
        assert re.fullmatch(r"[0-9a-f]{64}  \./\S+", line), line
