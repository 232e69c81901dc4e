"""The hub rehearsal (rehearsal/): a stand-in for every hub name the paper presets read, the paper
path run against them offline, a deliberately broken stand-in named by the run, and the bugs the
rehearsal found, each pinned.

The whole rehearsal (every paper preset and method, every lm-eval task of the paper tables, merges,
resume, eval.py) is ``make rehearse-paper`` (several minutes on 2 cores, so not a test); here one
step runs end to end, plus the broken stand-in (about 40 s together).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml

from experiments.data.columns import require_columns
from experiments.evaluation.harness import flat_metrics
from experiments.paths import LM_EVAL_TASKS_DIR, REPO_ROOT
from rehearsal import standins
from rehearsal.rehearse import SHRINK, Expect, Step, run_step, steps, sweep
from rehearsal.standins import DATASETS, LLAMA2, T5_BASE, break_standin, build_standins, offline_environment

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------ every hub name has a stand-in

class _Tags(yaml.SafeLoader):
    """Reads lm-eval YAMLs: ``!function utils.x`` becomes the string ``utils.x``."""


_Tags.add_multi_constructor("!", lambda loader, tag, node: loader.construct_scalar(node))


def _yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Tags) or {}


def paper_hub_names() -> set[str]:
    """Every hub id the paper presets reach: models, training data, and the data of their lm-eval tasks."""
    names = set()
    for path in (REPO_ROOT / "conf" / "model").glob("*.yaml"):
        if _yaml(path).get("source") == "hub":
            names.add(_yaml(path)["hub_id"])
    for path in (REPO_ROOT / "conf" / "task").glob("*.yaml"):
        task = _yaml(path)
        names |= {task[k] for k in ("hub_id", "hub_dataset", "t5_tokenizer") if task.get(k)}
    for path in LM_EVAL_TASKS_DIR.glob("*yaml"):
        names |= {_yaml(path)["dataset_path"]} if "dataset_path" in _yaml(path) else set()
    import lm_eval
    mmlu = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default" / "_default_template_yaml"
    names.add(_yaml(mmlu)["dataset_path"])  # the built-in mmlu and mmlu_<subject> tasks
    from lm_eval_tasks import utils
    return names | set(utils.ADAPTLLM_REPOS.values())


def test_every_hub_name_the_paper_presets_read_has_a_stand_in():
    stand_ins = {LLAMA2, T5_BASE} | {spec.repo_id for spec in DATASETS}
    assert paper_hub_names() <= stand_ins, paper_hub_names() - stand_ins
    assert standins.FINANCE_CORPUS in stand_ins  # conf/task/finance.yaml leaves hub_id to the user


def test_stand_in_configs_cover_what_the_task_yamls_ask_for():
    import lm_eval
    records = {spec.repo_id: spec.records(REPO_ROOT / "data") for spec in DATASETS}
    builtin = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    subjects = {_yaml(p)["dataset_name"] for p in builtin.glob("mmlu_*.yaml")}
    assert subjects == set(records["cais/mmlu"]) and len(subjects) == 57
    math = {_yaml(p)["dataset_name"] for p in LM_EVAL_TASKS_DIR.glob("math_metamath_*.yaml")}
    assert math == set(records["EleutherAI/hendrycks_math"])
    from lm_eval_tasks import utils
    for path in LM_EVAL_TASKS_DIR.glob("*_adaptllm.yaml"):
        kwargs = _yaml(path).get("dataset_kwargs")
        if kwargs:  # a task, not a group
            assert kwargs["subset"] in records[utils.ADAPTLLM_REPOS[kwargs["domain"]]], path.name


# ------------------------------------------------------------------ the column check

def test_require_columns_names_the_data_set_split_and_column():
    rows = [{"question": "q", "response": "r"}]
    with pytest.raises(ValueError, match=r"^meta-math/MetaMathQA \(split train\) has no column 'query'; "
                                         r"its columns: \['question', 'response'\]$"):
        require_columns(rows, ("query", "response"), "meta-math/MetaMathQA", "train")
    assert require_columns(rows, ("question",), "x") is rows
    chats = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])
    assert require_columns(chats, ("messages.role", "messages.content"), "allenai/tulu-v2-sft-mixture") is chats
    with pytest.raises(ValueError, match=r"has no column 'messages.speaker'"):
        require_columns(chats, ("messages.speaker",), "allenai/tulu-v2-sft-mixture")
    stream = iter(rows)  # features unknown: not read, not checked
    assert require_columns(stream, ("query",), "x") is stream


# ------------------------------------------------------------------ bugs the rehearsal found

def test_a_group_score_carries_its_members_shot_count():
    """MMLU 5-shot was saved as ``mmlu/acc``, the 0-shot name (Table 1's two MMLU columns mixed up):
    lm-eval 0.4.13's ``n-shot`` lists the subjects and mmlu_stem-level groups, not ``mmlu`` itself."""
    raw = {"results": {"mmlu": {"acc,none": 0.5}, "mmlu_stem": {"acc,none": 0.4}, "mmlu_anatomy": {"acc,none": 0.3}},
           "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_anatomy"]},
           "n-shot": {"mmlu_stem": 5, "mmlu_anatomy": 5}}
    assert flat_metrics(raw) == {"mmlu@5shot/acc": 0.5, "mmlu_stem@5shot/acc": 0.4, "mmlu_anatomy@5shot/acc": 0.3}
    zero = raw | {"n-shot": {"mmlu_stem": 0, "mmlu_anatomy": 0}}
    assert set(flat_metrics(zero)) == {"mmlu/acc", "mmlu_stem/acc", "mmlu_anatomy/acc"}


# ------------------------------------------------------------------ the paper path on the stand-ins

@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return build_standins(tmp_path_factory.mktemp("rehearsal") / "hf_home").home


def test_the_stand_ins_resolve_the_real_names_offline(home):
    """Read back in a fresh process (the libraries read HF_HOME when imported) through the hub names."""
    script = """
import datasets, transformers
from transformers import AutoConfig, AutoTokenizer, T5TokenizerFast
tok = AutoTokenizer.from_pretrained("meta-llama/Llama-2-7b-hf")
assert type(tok).__name__ == "LlamaTokenizer" and tok("a")["input_ids"][0] == tok.bos_token_id == 1
assert AutoConfig.from_pretrained("meta-llama/Llama-2-7b-hf").model_type == "llama"
assert len(T5TokenizerFast.from_pretrained("t5-base")) == 32100
assert datasets.load_dataset("cais/mmlu", "anatomy", split="dev").features["answer"].names == list("ABCD")
stream = datasets.load_dataset("allenai/c4", "en", split="validation", streaming=True)
assert stream.column_names == ["text", "timestamp", "url"] and next(iter(stream))["text"]
assert datasets.load_dataset("AdaptLLM/finance-tasks", "Headline", split="test")[0]["class_id"] == 0
"""
    env = {**os.environ, **offline_environment(home)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_stand_ins_are_deterministic(home, tmp_path):
    """The same files on every build: the repositories' data files, the model's (its commit is their hash)."""
    for spec in DATASETS:
        again = standins.write_repo(spec, tmp_path / "repos", REPO_ROOT / "data")
        for path in (p for p in again.rglob("*") if p.is_file()):
            assert path.read_bytes() == (home / "repos" / "datasets" / path.relative_to(tmp_path / "repos")).read_bytes()
    snapshot = standins.write_hub_model(tmp_path / "hub", LLAMA2, standins.llama2_files(REPO_ROOT / "data"))
    assert snapshot.name == os.listdir(home / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots")[0]


METAMATH_R8 = Step("metamath_paper", "mora r=8 + gsm8k_metamath", "the subset the suite runs",
                   sweep("scale=paper", "task=metamath", "experiment=finetune_r8", "method=mora",
                         *SHRINK["llama2_7b"], *SHRINK["finetune"], "task.lm_eval_tasks=[gsm8k_metamath]",
                         "out_root={out}"),
                   Expect(runs=1, final=("lm_eval_first2/gsm8k_metamath/exact_match",),
                          files=("checkpoint.pt", "eval_results.json")))


def _env(home: Path) -> dict:
    return {**os.environ, **offline_environment(home), "PYTHONPATH": str(REPO_ROOT)}


def test_a_paper_preset_runs_against_the_stand_ins(home, tmp_path):
    outcome = run_step(METAMATH_R8, tmp_path, _env(home), set())
    assert outcome.passed, outcome.problems
    [summary] = [json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")]
    assert summary["final"]["lm_eval_first2/gsm8k_metamath/n_samples"] == 2


def test_a_renamed_column_fails_the_run_naming_the_data_set_and_column(home, tmp_path):
    broken = break_standin(home, tmp_path / "broken", "meta-math/MetaMathQA", "query", "question")
    outcome = run_step(METAMATH_R8, tmp_path / "work", _env(broken), set())
    assert not outcome.passed
    [problem] = outcome.problems
    assert "exit code 2" in problem
    assert "meta-math/MetaMathQA (split train) has no column 'query'" in problem, problem


def test_the_rehearsal_covers_every_paper_preset_and_table():
    keys = [step.key for step in steps()]
    presets = {key.split("/")[0] for key in keys}
    assert presets == {p.stem for p in (REPO_ROOT / "conf" / "preset").glob("*_paper.yaml")} | {"c4_paper"}
    text = " ".join(keys)
    for needle in ("Table 1 methods", "mmlu 0-shot", "mmlu 5-shot", "Table 4 operators", "biomed_adaptllm",
                   "finance_adaptllm", "250M", "1.3B", "resume", "eval.py"):
        assert needle in text, needle
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "rehearse-paper:" in makefile and "-m rehearsal" in makefile
