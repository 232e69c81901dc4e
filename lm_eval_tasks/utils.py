"""Data, prompts, answers, held-out splits and AdaptLLM scoring of our lm-eval tasks (README.md).

lm-eval loads this file by path (``!function utils.<name>`` in a YAML beside it). The prompts, the
"The answer is: X" reader and the held-out rule are experiments/data/finetune.py's, which the
training side uses too; they are importable from here under the same names. Everything is a
pure function: the task settings arrive as keyword arguments.

Local data. A ``custom_dataset`` function is called by lm-eval with the task's ``metadata`` and
``dataset_kwargs`` as keyword arguments (lm_eval.api.task.ConfigurableTask.download), and
``TaskManager(metadata=...)`` adds its metadata to every task. So ``data_root`` (the offline data
folder) is passed once to the TaskManager by experiments/evaluation/harness.py and reaches every loader
here as an absolute path; a YAML ``data_files`` entry would resolve against the working
directory instead. Every file is checked against SHA256SUMS before it is read. The same
mechanism hands the evaluated model's ``tokenizer`` and window (``max_length``) to the tasks
whose metric is per token.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import datasets

# Prompts, answer reading and the held-out rule are the training side's (one definition each), so
# a model is scored on the prompts it was trained with and never on an item it was trained on.
from experiments.data.finetune import (ALPACA_FILE, GSM8K_FILES, HELDOUT_EVERY, METAMATH_PROMPT,  # noqa: F401
                                       PUBMEDQA_DECISIONS, PUBMEDQA_FILE, alpaca_eval_indices, alpaca_prompt,
                                       extract_gsm8k_answer, extract_metamath_answer, gsm8k_to_metamath,
                                       is_heldout, load_pubmedqa, normalize_number, pubmedqa_abstract,
                                       pubmedqa_eval_ids, pubmedqa_ids, pubmedqa_prompt, pubmedqa_train_ids,
                                       split_pubmedqa)
from experiments.data.columns import require_columns
from experiments.data.offline import DEFAULT_DATA_ROOT, verify_files

GSM8K_TEST = GSM8K_FILES["test"]


def metamath_prompt(doc: dict) -> str:
    """The MetaMath prompt of a GSM8K (``question``) or MATH (``problem``) record."""
    return METAMATH_PROMPT.format(instruction=doc["question"] if "question" in doc else doc["problem"])


# ------------------------------------------------------------------------------ answers

def gsm8k_gold(answer: str) -> str:
    """The normalised number after GSM8K's final "#### "."""
    gold = extract_gsm8k_answer(answer)
    if gold is None:
        raise ValueError(f"a GSM8K answer ends with '#### N'; got {answer[-80:]!r}")
    return gold


def gsm8k_metamath_results(doc: dict, results: list[str]) -> dict:
    """exact_match: the number after "The answer is:" equals the reference's (MetaMath's rule)."""
    predicted = normalize_number(extract_metamath_answer(results[0]))
    return {"exact_match": int(predicted is not None and predicted == doc["gold"])}


def math_metamath_results(doc: dict, results: list[str]) -> dict:
    """exact_match on MATH: the text after "The answer is:" equals the boxed reference answer
    under Hendrycks et al.'s string normalisation (lm-eval's hendrycks_math implementation)."""
    from lm_eval.tasks.hendrycks_math.utils import is_equiv, last_boxed_only_string, remove_boxed

    predicted = extract_metamath_answer(results[0])
    gold = remove_boxed(last_boxed_only_string(doc["solution"]))
    return {"exact_match": int(predicted is not None and is_equiv(predicted, gold))}


# ------------------------------------------------------------------------------ token counts

def continuation_token_counts(tokenizer, contexts: Sequence[str], continuations: Sequence[str]) -> list[int]:
    """How many tokens lm-eval scores for each (context, continuation) loglikelihood request.

    Mirrors lm-eval's ``_encode_pair`` for causal models: trailing whitespace of the context moves
    to the continuation, the joined text and the context are encoded, and the continuation is the
    difference. A per-token mean needs exactly these counts (lm-eval returns only the sum).
    """
    pairs = [(c.rstrip(), c[len(c.rstrip()):] + x) for c, x in zip(contexts, continuations, strict=True)]
    whole = tokenizer([c + x for c, x in pairs], add_special_tokens=False)["input_ids"]
    context = tokenizer([c for c, _ in pairs], add_special_tokens=False)["input_ids"]
    return [len(w) - len(c) for w, c in zip(whole, context)]


def require_tokenizer(tokenizer, task: str):
    if tokenizer is None:
        raise ValueError(f"{task} reports per-token metrics and needs the evaluated model's tokenizer: pass "
                         "TaskManager(metadata={'tokenizer': <tokenizer>}) (experiments/evaluation/harness.py does)")
    return tokenizer


def mean_nll(items: list[tuple[float, int]]) -> float:
    """Token-weighted mean negative log-likelihood (nats per token) of (loglikelihood, tokens) pairs."""
    return -sum(ll for ll, _ in items) / sum(n for _, n in items)


def token_perplexity(items: list[tuple[float, int]]) -> float:
    return math.exp(mean_nll(items))


def answer_nll_results(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """Per-request (loglikelihood, scored tokens, bytes) for the corpus-level aggregations."""
    (loglikelihood, _), = results
    pair = (loglikelihood, doc["n_target_tokens"])
    return {"nll_per_token": pair, "token_perplexity": pair,
            "bits_per_byte": (loglikelihood, len(doc["target"].encode("utf-8")))}


# ------------------------------------------------------------------------------ loaders (custom_dataset)

def _local_file(data_root, relative: str) -> Path:
    (path,) = verify_files(data_root or DEFAULT_DATA_ROOT, [relative])
    return path


def _test_split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _with_target_tokens(rows: list[dict], tokenizer, task: str, max_length: int | None) -> list[dict]:
    """``rows`` with the tokens lm-eval scores in each target; with ``max_length`` (the model's
    window, from experiments/evaluation/harness.py) only rows whose prompt and target fit in it whole:
    lm-eval would cut a longer prompt from the left, or fail on a target longer than the window,
    and an NLL given half a prompt is not comparable. The same rows for every model of one base."""
    tokenizer = require_tokenizer(tokenizer, task)
    prompts, targets = [r["prompt"] for r in rows], [r["target"] for r in rows]
    counts = continuation_token_counts(tokenizer, prompts, targets)
    rows = [row | {"n_target_tokens": n} for row, n in zip(rows, counts)]
    if max_length is None:
        return rows
    lengths = [len(ids) for ids in tokenizer([p + t for p, t in zip(prompts, targets)])["input_ids"]]
    return [row for row, n in zip(rows, lengths) if n <= max_length]


def gsm8k_row(record: dict) -> dict:
    """A GSM8K record (``question``, ``answer``) with its MetaMath prompt, the normalised gold
    number and the reference solution rewritten MetaMath-style (the NLL target)."""
    return {"question": record["question"], "prompt": metamath_prompt(record), "gold": gsm8k_gold(record["answer"]),
            "target": gsm8k_to_metamath(record["answer"])}


def process_gsm8k_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """The hub's ``openai/gsm8k`` test split, given the same fields as the offline copy."""
    require_columns(dataset, ("question", "answer"), "openai/gsm8k (gsm8k_metamath's dataset_path)")
    return dataset.map(gsm8k_row, remove_columns=dataset.column_names)


def load_gsm8k_test(data_root=None, tokenizer=None, count_tokens: bool = False, max_length: int | None = None,
                    **_) -> datasets.DatasetDict:
    """GSM8K's 1,319 test problems (offline copy) as :func:`gsm8k_row`; with ``count_tokens`` also
    the tokens lm-eval scores in the target (``gsm8k_local_answer_nll``; see _with_target_tokens)."""
    lines = _local_file(data_root, GSM8K_TEST).read_text(encoding="utf-8").splitlines()
    rows = [gsm8k_row(json.loads(line)) for line in lines if line.strip()]
    if count_tokens:
        rows = _with_target_tokens(rows, tokenizer, "gsm8k_local_answer_nll", max_length)
    return _test_split(rows)


def load_pubmedqa_eval(data_root=None, heldout_every: int = HELDOUT_EVERY, **_) -> datasets.DatasetDict:
    """The held-out PubMedQA-L questions (:func:`pubmedqa_eval_ids`) with prompt and gold index."""
    _, heldout = split_pubmedqa(load_pubmedqa(data_root or DEFAULT_DATA_ROOT), heldout_every)
    return _test_split([{"pmid": item.pmid, "prompt": pubmedqa_prompt(item),
                         "label": PUBMEDQA_DECISIONS.index(item.decision)} for item in heldout])


def load_pubmed_abstracts(data_root=None, heldout_every: int = HELDOUT_EVERY, **_) -> datasets.DatasetDict:
    """The whole abstracts (contexts, then conclusion) of the held-out PubMedQA-L items, for
    rolling perplexity: the text continual pretraining trains on for the other items."""
    _, heldout = split_pubmedqa(load_pubmedqa(data_root or DEFAULT_DATA_ROOT), heldout_every)
    return _test_split([{"pmid": item.pmid, "text": pubmedqa_abstract(item)} for item in heldout])


def load_alpaca_heldout(data_root=None, tokenizer=None, heldout_every: int = HELDOUT_EVERY,
                        max_length: int | None = None, **_) -> datasets.DatasetDict:
    """The held-out Alpaca examples (:func:`alpaca_eval_indices`): Alpaca prompt and reference
    response, with the scored token counts (see _with_target_tokens)."""
    data = json.loads(_local_file(data_root, ALPACA_FILE).read_text(encoding="utf-8"))
    rows = [{"index": i, "prompt": alpaca_prompt(data[i]["instruction"], data[i]["input"]),
             "target": data[i]["output"]} for i in alpaca_eval_indices(len(data), heldout_every)]
    return _test_split(_with_target_tokens(rows, tokenizer, "alpaca_local_nll", max_length))


# ------------------------------------------------------------------------------ AdaptLLM (Tables 6-7)
# AdaptLLM's evaluation sets (Cheng et al. 2024; microsoft/LMOps, adaptllm/) hold a complete prompt
# in ``input``, few-shot demonstrations included. Classification records add ``options`` and
# ``gold_index``: AdaptLLM's scorer appends " " + option and predicts the option with the lowest
# MEAN negative log-likelihood per token (adaptllm/inference.py), which lm-eval's acc (sum) and
# acc_norm (per character) are not; the token counts come from the tokenizer at load time.
# Generation records (ConvFinQA, NER) hold ``label``: greedy decoding to the first newline.

ADAPTLLM_REPOS = {"medicine": "AdaptLLM/medicine-tasks", "finance": "AdaptLLM/finance-tasks"}
# the fields our tasks read: classification sets (options, gold_index; Headline also class_id), generation sets (label)
ADAPTLLM_COLUMNS = {"PubMedQA": ("options", "gold_index"), "USMLE": ("options", "gold_index"),
                    "RCT": ("options", "gold_index"), "FiQA_SA": ("options", "gold_index"),
                    "FPB": ("options", "gold_index"), "Headline": ("options", "gold_index", "class_id"),
                    "ConvFinQA": ("label",), "NER": ("label",)}


def load_adaptllm(domain: str, subset: str, tokenizer=None, adaptllm_root=None, **_) -> datasets.DatasetDict:
    """The test split of AdaptLLM's ``subset`` of ``domain``: from the hub, or from
    ``<adaptllm_root>/<subset>.jsonl`` (a local copy with the same records) when that is given.
    Multiple-choice records get ``option_tokens``: the tokens lm-eval scores for each option."""
    if adaptllm_root:
        lines = (Path(adaptllm_root) / f"{subset}.jsonl").read_text(encoding="utf-8").splitlines()
        test = datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])
    else:
        test = datasets.load_dataset(ADAPTLLM_REPOS[domain], subset, split="test")
    source = f"{adaptllm_root}/{subset}.jsonl" if adaptllm_root else f"{ADAPTLLM_REPOS[domain]} config {subset}"
    require_columns(test, ("input", *ADAPTLLM_COLUMNS.get(subset, ())), source, None if adaptllm_root else "test")
    if "options" in test.column_names:
        tokenizer = require_tokenizer(tokenizer, f"AdaptLLM {subset}")
        test = test.add_column("option_tokens", _option_token_counts(tokenizer, test["input"], test["options"]))
    return datasets.DatasetDict({"test": test})


def _option_token_counts(tokenizer, inputs: list[str], options: list[list[str]]) -> list[list[int]]:
    contexts = [text for text, opts in zip(inputs, options) for _ in opts]
    flat = continuation_token_counts(tokenizer, contexts, [" " + o for opts in options for o in opts])
    counts, start = [], 0
    for opts in options:
        counts.append(flat[start:start + len(opts)])
        start += len(opts)
    return counts


def mean_token_choice(doc: dict, results: list[tuple[float, bool]]) -> int:
    """AdaptLLM's prediction: the option of highest mean log-likelihood per token (first on ties)."""
    means = [ll / n for (ll, _), n in zip(results, doc["option_tokens"], strict=True)]
    return max(range(len(means)), key=means.__getitem__)


def adaptllm_acc_results(doc: dict, results) -> dict:
    """PubMedQA, USMLE (accuracy) and RCT (micro-F1, which equals accuracy with one label each)."""
    return {"acc": int(mean_token_choice(doc, results) == doc["gold_index"])}


def adaptllm_f1_results(doc: dict, results) -> dict:
    """FPB and FiQA SA: (gold, prediction) pairs for the weighted F1 over the whole set."""
    pair = (doc["gold_index"], mean_token_choice(doc, results))
    return {"weighted_f1": pair, "score": pair}


def adaptllm_headline_results(doc: dict, results) -> dict:
    """Headline: nine yes/no questions per headline, told apart by ``class_id``."""
    item = (doc["class_id"], doc["gold_index"], mean_token_choice(doc, results))
    return {"headline_f1": item, "score": item}


def weighted_f1(items: list[tuple[int, int]]) -> float:
    """F1 per class weighted by the class's support (sklearn's ``average="weighted"``, AdaptLLM's)."""
    from sklearn.metrics import f1_score

    gold, predicted = zip(*items)
    return float(f1_score(gold, predicted, average="weighted"))


def headline_f1(items: list[tuple[int, int, int]]) -> float:
    """The mean over Headline's questions (class ids) of each question's weighted F1 (AdaptLLM's
    compute_headline; it divides by 9, the number of questions, all present in the full test set)."""
    by_class: dict[int, list[tuple[int, int]]] = {}
    for class_id, gold, predicted in items:
        by_class.setdefault(class_id, []).append((gold, predicted))
    return sum(weighted_f1(pairs) for pairs in by_class.values()) / len(by_class)


def _first_label(doc: dict) -> str:
    label = doc["label"]
    return label if isinstance(label, str) else label[0]


# AdaptLLM's number pattern (src/utils/qa_utils.py): sign, thousands groups, decimals, exponent, "%"
_CONVFINQA_NUMBER = re.compile(r"[-+]?[.]?\d+(?:,\d\d\d)*[.]?\d*(?:[eE][-+]?\d+)?%*")


def convfinqa_numbers(text: str) -> list[float]:
    """The numbers on the first line of ``text`` (an answer starting with a newline has none);
    "12%" is 0.12; unparsable ones are inf (never equal)."""
    values = []
    for token in _CONVFINQA_NUMBER.findall(text.split("\n")[0].strip()):
        digits = token.rstrip("%").replace(",", "")
        try:
            values.append(float(digits) / 100 ** (len(token) - len(token.rstrip("%"))))
        except ValueError:
            values.append(math.inf)
    return values


def convfinqa_results(doc: dict, results: list[str]) -> dict:
    """Correct when any number of the answer's first line is within 0.01 of the reference's first."""
    gold, predicted = convfinqa_numbers(" " + _first_label(doc)), convfinqa_numbers(results[0])
    correct = bool(gold) and any(math.isclose(p, gold[0], abs_tol=1e-2) for p in predicted)
    return {"exact_match": int(correct), "score": int(correct)}


_NER_ENTITY = re.compile(r"(\S+)\s+\((\S+)\)")


def ner_entities(text: str) -> list[tuple[str, str]]:
    """The ``word (TYPE)`` pairs of an answer, first occurrences in order (AdaptLLM's parse_ner)."""
    found = []
    for entity in _NER_ENTITY.findall(text):
        if entity not in found:
            found.append(entity)
    return found


def ner_f1(gold: list[tuple[str, str]], predicted: list[tuple[str, str]]) -> float:
    """Entity F1 on two axes, text and type, as nereval (MUC style; Nadeau and Sekine 2007) counts
    it for AdaptLLM, whose entities all sit at offset 0 so that any two overlap: each gold entity
    is matched with the first prediction sharing its text or its type and scores one per shared
    axis; precision and recall divide by two per predicted and per gold entity."""
    correct = 0
    for text, kind in gold:
        match = next(((t, k) for t, k in predicted if t == text or k == kind), None)
        if match is not None:
            correct += (match[0] == text) + (match[1] == kind)
    precision = correct / (2 * len(predicted)) if predicted else 0.0
    recall = correct / (2 * len(gold)) if gold else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def ner_results(doc: dict, results: list[str]) -> dict:
    """Entity F1 of one answer; the task's score is its mean over the set (AdaptLLM's compute_ner)."""
    f1 = ner_f1(ner_entities(_first_label(doc)), ner_entities(results[0]))
    return {"entity_f1": f1, "score": f1}
