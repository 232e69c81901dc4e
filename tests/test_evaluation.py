"""lm-eval on the trained model object: every mini task runs on stories260K, adapted and merged
models score the same, the per-token and AdaptLLM scorers agree with direct computations, every
paper-scale YAML resolves without a download, the held-out splits are sound, and the CLI
evaluates a run folder written by experiments/run.py.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re

import datasets
import pytest
import torch

from experiments.eval import load_run, main
from experiments.paths import LM_EVAL_TASKS_DIR as TASKS_DIR
from experiments.evaluation.harness import (evaluate_with_lm_eval, flat_metrics, read_eval_results, resolvable,
                                    save_eval_results, task_manager)
from experiments.models.loading import load_stories260k
from experiments.data.offline import DEFAULT_DATA_ROOT, verify_files
from experiments.data import finetune as finetune_data
from lm_eval_tasks import utils
from mora.adapters import AdapterConfig, adapter_layers, inject_adapters, merge_and_unload, save_adapter

MINI_TASKS = ["gsm8k_local_metamath", "gsm8k_local_answer_nll", "pubmedqa_local", "pubmed_abstracts_ppl",
              "alpaca_local_nll"]
PAPER_TASKS = ["mmlu", "gsm8k_metamath", "math_metamath", "biomed_adaptllm", "pubmedqa_adaptllm", "usmle_adaptllm",
               "mmlu_biomed", "rct_adaptllm", "finance_adaptllm", "convfinqa_adaptllm", "fiqa_sa_adaptllm",
               "headline_adaptllm", "ner_adaptllm", "fpb_adaptllm"]
MATH_SUBJECTS = [f"math_metamath_{s}" for s in ("algebra", "counting_and_probability", "geometry",
                                                "intermediate_algebra", "number_theory", "prealgebra", "precalculus")]
LOGLIKELIHOOD_TASKS = ["gsm8k_local_answer_nll", "pubmedqa_local", "pubmed_abstracts_ppl"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def stories():
    return load_stories260k()


@pytest.fixture
def model(stories):
    return copy.deepcopy(stories[0])


# ------------------------------------------------------------------ answers and splits

GSM8K_FIRST = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day "
               "at the farmer\u2019s market.\n#### 18")


def test_answer_extraction_on_gsm8k_style_strings():
    # one implementation, the training side's (its cases: tests/test_finetune_data.py::ANSWERS)
    assert utils.extract_metamath_answer is finetune_data.extract_metamath_answer
    assert utils.normalize_number is finetune_data.normalize_number
    styled = utils.gsm8k_to_metamath(GSM8K_FIRST)
    assert styled.endswith("market.\nThe answer is: 18") and "<<" not in styled
    assert utils.gsm8k_gold(GSM8K_FIRST) == "18"
    assert utils.extract_metamath_answer(styled) == "18"
    with pytest.raises(ValueError, match="####"):
        utils.gsm8k_gold("She makes 18 dollars.")
    doc = {"gold": "18"}
    assert utils.gsm8k_metamath_results(doc, ["... The answer is: 18"]) == {"exact_match": 1}
    assert utils.gsm8k_metamath_results(doc, ["... The answer is: $18.00 a day."]) == {"exact_match": 1}
    assert utils.gsm8k_metamath_results(doc, ["... The answer is: 17"]) == {"exact_match": 0}
    assert utils.gsm8k_metamath_results(doc, ["18"]) == {"exact_match": 0}  # no mark: MetaMath scores it wrong


def test_every_gsm8k_reference_round_trips_through_the_extractor():
    rows = utils.load_gsm8k_test()["test"]
    assert len(rows) == 1319
    assert all(utils.normalize_number(utils.extract_metamath_answer(r["target"])) == r["gold"] for r in rows)
    # gsm8k_metamath gives the hub's split (same columns as the offline file) the same fields
    lines = verify_files(DEFAULT_DATA_ROOT, [utils.GSM8K_TEST])[0].read_text().splitlines()[:5]
    hub_like = datasets.Dataset.from_list([json.loads(line) for line in lines])
    assert utils.process_gsm8k_docs(hub_like).to_list() == rows.select(range(5)).to_list()


def test_math_answers_compare_after_hendrycks_normalisation():
    doc = {"solution": "So the probability is $\\boxed{\\frac{1}{2}}$."}
    assert utils.math_metamath_results(doc, ["The answer is: \\frac12"]) == {"exact_match": 1}
    assert utils.math_metamath_results(doc, ["The answer is: \\frac{1}{3}"]) == {"exact_match": 0}


def test_pubmedqa_eval_ids_are_deterministic_and_disjoint_from_training():
    data = json.loads(verify_files(DEFAULT_DATA_ROOT, [utils.PUBMEDQA_FILE])[0].read_text())
    shuffled = dict(random.Random(0).sample(list(data.items()), len(data)))  # key order must not matter
    eval_ids, train_ids = utils.pubmedqa_eval_ids(data), utils.pubmedqa_train_ids(data)
    assert eval_ids == utils.pubmedqa_eval_ids(shuffled) and train_ids == utils.pubmedqa_train_ids(shuffled)
    assert len(eval_ids) == 200 and len(train_ids) == 800
    assert not set(eval_ids) & set(train_ids) and set(eval_ids) | set(train_ids) == set(data)
    assert eval_ids == sorted(data, key=int)[::5]
    train_items, heldout_items = finetune_data.split_pubmedqa(finetune_data.load_pubmedqa())  # the training side
    assert [i.pmid for i in train_items] == train_ids and [i.pmid for i in heldout_items] == eval_ids
    assert utils.load_pubmedqa_eval()["test"]["pmid"] == eval_ids
    abstracts = utils.load_pubmed_abstracts()["test"]
    assert abstracts["pmid"] == eval_ids and data[eval_ids[0]]["LONG_ANSWER"] in abstracts["text"][0]


def test_alpaca_prompt_reproduces_the_records_text():
    records = json.loads(verify_files(DEFAULT_DATA_ROOT, [utils.ALPACA_FILE])[0].read_text())
    assert all(utils.alpaca_prompt(r["instruction"], r["input"]) + r["output"] == r["text"] for r in records)
    assert utils.alpaca_eval_indices(len(records)) == list(range(0, 100, 5))


# ------------------------------------------------------------------ the mini tasks on stories260K

def reference_nll(model, tokenizer, prompt: str, target: str) -> tuple[float, int]:
    """(summed NLL, tokens) of ``target`` after ``prompt``, straight from the model's logits."""
    prompt_ids = tokenizer(prompt.rstrip())["input_ids"]
    ids = tokenizer(prompt.rstrip() + prompt[len(prompt.rstrip()):] + target)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)  # (T-1, V)
    scored = range(len(prompt_ids), len(ids))
    return -sum(logprobs[t - 1, ids[t]].item() for t in scored), len(scored)


def test_every_mini_task_runs_in_process(stories):
    model, tokenizer = stories
    model.train()
    torch.manual_seed(7)
    expected_draw = torch.rand(3, generator=torch.Generator().manual_seed(7))
    results = evaluate_with_lm_eval(model, tokenizer, MINI_TASKS, limit=3, max_gen_toks=24, batch_size=4)
    m = results["metrics"]
    assert model.training  # the caller's mode is restored, and its random stream (lm-eval seeds its own)
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(m[f"{task}/n_samples"] == 3 for task in MINI_TASKS)
    assert m["gsm8k_local_metamath/exact_match"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert 0 <= m["pubmedqa_local/acc"] <= 1 and 0 <= m["pubmedqa_local/acc_norm"] <= 1
    for task in ("gsm8k_local_answer_nll", "alpaca_local_nll"):
        assert m[f"{task}/nll_per_token"] > 0 and m[f"{task}/bits_per_byte"] > 0
        assert math.isclose(m[f"{task}/token_perplexity"], math.exp(m[f"{task}/nll_per_token"]))
    assert m["pubmed_abstracts_ppl/word_perplexity"] > m["pubmed_abstracts_ppl/byte_perplexity"] > 1
    assert results["lm_eval"]["configs"]["alpaca_local_nll"]["metadata"]["tokenizer"].startswith("<")
    json.dumps(results)  # JSON-able as it is

    # the per-token NLL is the reference log-likelihood of the first documents over their tokens
    docs = utils.load_gsm8k_test(tokenizer=tokenizer, count_tokens=True, max_length=512)["test"]
    pairs = [reference_nll(model.eval(), tokenizer, d["prompt"], d["target"]) for d in docs.select(range(3))]
    assert [n for _, n in pairs] == docs["n_target_tokens"][:3]
    expected = sum(nll for nll, _ in pairs) / sum(n for _, n in pairs)
    assert math.isclose(m["gsm8k_local_answer_nll/nll_per_token"], expected, rel_tol=1e-5)


def randomise_adapters(model, seed: int) -> None:
    """Non-zero adapter weights (MoRA's M and LoRA's B start at zero, which would make ΔW = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, param in layer.named_parameters():
                if not name.startswith("base_layer."):
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))


ADAPTERS = {"mora-share": AdapterConfig(method="mora", rank=2, operator="share"),
            "mora-rotate": AdapterConfig(method="mora", rank=2, operator="rotate"),
            "lora": AdapterConfig(method="lora", rank=2, alpha=4)}


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapted_and_merged_models_score_identically(name, model, stories):
    inject_adapters(model, ADAPTERS[name])
    randomise_adapters(model, seed=1)
    merged = merge_and_unload(copy.deepcopy(model))
    assert not adapter_layers(merged)
    tasks = [*LOGLIKELIHOOD_TASKS, "gsm8k_local_metamath"]
    kwargs = dict(limit=4, max_gen_toks=16, batch_size=4, log_samples=True)
    adapted, folded = (evaluate_with_lm_eval(m, stories[1], tasks, **kwargs) for m in (model, merged))
    base = evaluate_with_lm_eval(stories[0], stories[1], ["gsm8k_local_answer_nll"], limit=4)["metrics"]
    a, b = adapted["metrics"], folded["metrics"]
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(("/acc", "/acc_norm", "/exact_match", "/n_samples")):
            assert a[key] == b[key], key
        else:
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a[key], b[key])
    generations = [[s["filtered_resps"] for s in r["lm_eval"]["samples"]["gsm8k_local_metamath"]]
                   for r in (adapted, folded)]
    assert generations[0] == generations[1]
    # the adapters change the model, so the equality above is not that of two base models
    assert abs(a["gsm8k_local_answer_nll/nll_per_token"] - base["gsm8k_local_answer_nll/nll_per_token"]) > 1e-3


# ------------------------------------------------------------------ paper-scale task definitions

def test_every_task_yaml_resolves_without_downloading(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = task_manager(PAPER_TASKS, metadata={})  # needs built-ins: mmlu and its subjects
    index = manager.task_index
    yaml_names = {re.search(r"^(?:task|group): (\S+)$", p.read_text(), re.M).group(1)
                  for p in TASKS_DIR.glob("*.yaml")}
    assert set(MINI_TASKS + PAPER_TASKS + MATH_SUBJECTS) - {"mmlu"} == yaml_names
    assert all(resolvable(name, index) for name in yaml_names | {"mmlu"})  # every YAML parsed: lm-eval skips bad ones
    for path in [*TASKS_DIR.glob("*.yaml"), *TASKS_DIR.glob("_*_yaml")]:
        for function in re.findall(r"!function utils\.(\w+)", path.read_text()):
            assert callable(getattr(utils, function, None)), (path.name, function)
    readme = (TASKS_DIR / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in yaml_names - set(MATH_SUBJECTS))  # subjects: `math_metamath_<subject>`
    assert task_manager(MINI_TASKS, metadata={}).task_index.keys() <= yaml_names  # mini tasks skip the built-ins


# ------------------------------------------------------------------ AdaptLLM scoring

def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


SENTIMENT = ["positive", "negative", "neutral"]


@pytest.fixture
def adaptllm_root(tmp_path):
    """Local copies in AdaptLLM's record format: a prompt with the demonstrations inside, then
    ``options`` / ``gold_index`` (classification) or ``label`` (generation)."""
    demo = "Once upon a time there was a happy girl. Sentiment: positive\n"
    texts = ["Lily was sad.", "Tom played in the park.", "The dog ran away.", "Mom smiled."]
    choice = [{"input": demo + f"{text} Sentiment:", "options": SENTIMENT, "gold_index": i % 3}
              for i, text in enumerate(texts)]
    for subset in ("FPB", "FiQA_SA", "PubMedQA"):
        write_jsonl(tmp_path / f"{subset}.jsonl", choice)
    write_jsonl(tmp_path / "Headline.jsonl", [{"input": "Gold rises. Does the news talk about price up?",
                                               "options": ["Yes", "No"], "gold_index": i % 2, "class_id": i % 3}
                                              for i in range(6)])
    write_jsonl(tmp_path / "NER.jsonl", [{"input": "Lily met Tom at the bank.\nEntities:", "label": "Lily (PER)"}])
    write_jsonl(tmp_path / "ConvFinQA.jsonl", [{"input": "Once upon a time there were", "label": "3"}])
    return tmp_path


def test_adaptllm_tasks_pick_the_option_of_lowest_mean_token_loss(stories, adaptllm_root):
    model, tokenizer = stories
    results = evaluate_with_lm_eval(model, tokenizer, ["finance_adaptllm", "pubmedqa_adaptllm"],
                                    adaptllm_root=adaptllm_root, log_samples=True, max_gen_toks=8)
    m = results["metrics"]
    five = ["convfinqa_adaptllm", "fiqa_sa_adaptllm", "headline_adaptllm", "ner_adaptllm", "fpb_adaptllm"]
    assert math.isclose(m["finance_adaptllm/score"], sum(m[f"{t}/score"] for t in five) / 5)
    assert m["fpb_adaptllm/score"] == m["fpb_adaptllm/weighted_f1"]
    for sample in results["lm_eval"]["samples"]["fpb_adaptllm"]:
        doc = sample["doc"]
        means = [reference_nll(model, tokenizer, doc["input"], " " + o) for o in doc["options"]]
        assert [n for _, n in means] == doc["option_tokens"]
        predicted = min(range(3), key=lambda i: means[i][0] / means[i][1])
        assert sample["weighted_f1"] == [doc["gold_index"], predicted]
    accuracy = [s["acc"] for s in results["lm_eval"]["samples"]["pubmedqa_adaptllm"]]
    assert m["pubmedqa_adaptllm/acc"] == sum(accuracy) / len(accuracy)


def test_adaptllm_metrics_follow_their_definitions():
    gold = [("Apple", "ORG"), ("Bob", "PER")]
    assert math.isclose(utils.ner_f1(gold, [("Apple", "ORG")]), 2 / 3)  # P = 2/2, R = 2/4
    assert math.isclose(utils.ner_f1(gold, [("Apple", "PER")]), 2 / 3)  # text of Apple, type of Bob
    assert utils.ner_f1(gold, []) == 0 and utils.ner_f1(gold, gold) == 1
    assert utils.ner_entities("Apple (ORG) sued Bob (PER), Apple (ORG).") == [("Apple", "ORG"), ("Bob", "PER")]
    assert utils.convfinqa_results({"label": "0.125"}, ["12.5% of it\n7"]) == {"exact_match": 1, "score": 1}
    assert utils.convfinqa_results({"label": ["1,200"]}, ["about 1200.004"])["score"] == 1
    assert utils.convfinqa_results({"label": "3"}, ["\n3"])["score"] == 0  # only the first line counts
    assert utils.weighted_f1([(0, 0), (1, 1), (1, 0)]) == pytest.approx((1 * 2 / 3 + 2 * 2 / 3) / 3)
    assert utils.headline_f1([(0, 1, 1), (0, 0, 0), (1, 1, 0)]) == pytest.approx((1 + 0) / 2)


# ------------------------------------------------------------------ results files and the CLI

def test_flat_metric_names_and_saved_results(tmp_path):
    raw = {"results": {"mmlu": {"alias": "mmlu", "acc,none": 0.5, "acc_stderr,none": "N/A"},
                       "gsm8k": {"exact_match,strict-match": 0.25}},
           "n-shot": {"mmlu": 5, "gsm8k": 0}, "n-samples": {"gsm8k": {"original": 8, "effective": 4}}}
    assert flat_metrics(raw) == {"mmlu@5shot/acc": 0.5, "gsm8k/exact_match/strict-match": 0.25,
                                 "gsm8k/n_samples": 4.0}
    full = {"metrics": {"a/acc": 0.5}, "lm_eval": {}, "settings": {"limit": None}}
    save_eval_results(tmp_path, full, merged=False)
    save_eval_results(tmp_path, {"metrics": {"a/acc": 0.9}, "lm_eval": {}, "settings": {"limit": 2}}, merged=True)
    saved = read_eval_results(tmp_path)
    assert saved["metrics"] == {"a/acc": 0.5}  # a limited evaluation is kept but never a headline number
    assert [e["merged"] for e in saved["evaluations"]] == [False, True]
    # eval.py --out may name a folder that does not exist yet
    assert save_eval_results(tmp_path / "new" / "folder", full).is_file()


def test_cli_evaluates_a_run_folder_and_its_saved_adapter(tmp_path):
    from experiments.run import execute
    from tests.test_configs import compose
    from tests.test_run_smoke import TINY

    run_dir = tmp_path / "run"  # ReMoRA: restored sharing groups and merged base weights are exercised
    summary = execute(compose(*TINY, "method=remora", "method.merge_every=2", f"out_dir={run_dir}"))
    assert summary["status"] == "completed"
    args = ["--run", str(run_dir), "--tasks", "pubmedqa_local,gsm8k_local_answer_nll", "--limit", "3",
            "--device", "cpu"]
    adapted, merged = main(args)["metrics"], main([*args, "--merge"])["metrics"]
    assert adapted.keys() == merged.keys()
    assert all(math.isclose(adapted[k], merged[k], rel_tol=1e-4, abs_tol=1e-6) for k in adapted)
    saved = read_eval_results(run_dir)
    assert [e["merged"] for e in saved["evaluations"]] == [False, True]
    assert saved["evaluations"][0]["checkpoint_step"] == 3 and saved["metrics"] == {}  # --limit: not headline

    model, _, run, _ = load_run(run_dir, "cpu")
    assert any(layer.mora.M.abs().sum() > 0 for layer in adapter_layers(model).values())  # trained weights loaded
    save_adapter(model, tmp_path / "adapter", run.adapter)
    from_adapter = main(["--adapter", str(tmp_path / "adapter"), "--model", "stories260k", *args[2:]])["metrics"]
    assert from_adapter == adapted
    assert read_eval_results(tmp_path / "adapter")["evaluations"][0]["base_model"] == "stories260k"


def test_cli_loads_a_full_finetuning_run(tmp_path):
    """FFT checkpoints hold every weight once: stories260K's lm_head is tied to the embedding."""
    from experiments.run import execute
    from experiments.loop.checkpoint import CHECKPOINT
    from tests.test_configs import compose
    from tests.test_run_smoke import TINY

    run_dir = tmp_path / "run"
    assert execute(compose(*TINY, "method=fft", f"out_dir={run_dir}"))["status"] == "completed"
    model, *_ = load_run(run_dir, "cpu")
    saved = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)["weights"]
    assert "lm_head.weight" not in saved and model.lm_head.weight is model.model.embed_tokens.weight
    assert saved.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in model.named_parameters())
    metrics = main(["--run", str(run_dir), "--tasks", "pubmedqa_local", "--limit", "2", "--device", "cpu"])["metrics"]
    assert metrics["pubmedqa_local/n_samples"] == 2
