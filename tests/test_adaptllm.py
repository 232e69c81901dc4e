"""AdaptLLM reading comprehension (Cheng et al. 2023) on real PubMedQA abstracts: the raw text is
kept whole, every mined task is grounded in it, output is a function of (text, seed), and a text
with nothing to mine passes through unchanged."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter

import pytest

from experiments.data.adaptllm import (KINDS, AdaptLLMConfig, convert_corpus, domain_keywords, mine_tasks,
                                  mix_with_instructions, reading_comprehension, split_sentences, text_rng)
from experiments.data.finetune import load_pubmedqa, pubmedqa_abstract, split_pubmedqa
from experiments.data.offline import DEFAULT_DATA_ROOT, verify_files

LABEL_ANSWERS = {"nli": {"Yes", "No", "Maybe"}}
C4_FILE = "c4/c4-sample.00000-of-00001.json.gz"


@pytest.fixture(scope="module")
def train_items():
    return split_pubmedqa(load_pubmedqa())[0]


@pytest.fixture(scope="module")
def abstracts(train_items):
    return [pubmedqa_abstract(item) for item in train_items]


@pytest.fixture(scope="module")
def keywords(abstracts):
    (c4,) = verify_files(DEFAULT_DATA_ROOT, [C4_FILE])
    with gzip.open(c4, "rt") as f:
        general = [json.loads(line)["text"] for line in f]
    return domain_keywords(abstracts, general)


def in_text(span: str, text: str) -> bool:
    """``span`` occurs in ``text``, allowing a clause after a connector to have been capitalised."""
    return span in text or (span[:1].lower() + span[1:]) in text


def test_every_output_keeps_its_text_and_every_task_is_grounded(train_items, abstracts, keywords):
    config = AdaptLLMConfig()
    kinds = Counter()
    for item, text in zip(train_items, abstracts):
        tasks = mine_tasks(text, config, text_rng(text, 0), item.question, keywords)
        output = reading_comprehension(text, config, 0, item.question, keywords)
        assert output.startswith(text)
        assert len(tasks) <= config.max_tasks
        for task in tasks:
            kinds[task.kind] += 1
            assert f"{task.question}\nAnswer: {task.answer}" in output
            assert all(in_text(span, text) for span in task.evidence), task
            if task.kind == "summarize":
                assert task.answer == item.question  # PubMedQA's question is the article's title
            elif task.kind in LABEL_ANSWERS:
                assert task.answer in LABEL_ANSWERS[task.kind]
            else:
                assert in_text(task.answer, text), task   # the answer sentence is the text's own
    assert set(kinds) == set(KINDS)  # 800 real abstracts exercise every task kind


def test_same_seed_same_output_other_seed_other_choices(abstracts, keywords):
    texts = abstracts[:60]
    first = convert_corpus(texts, seed=1, keywords=keywords)
    assert convert_corpus(texts, seed=1, keywords=keywords) == first
    assert convert_corpus(texts, seed=2, keywords=keywords) != first
    # a text's output does not depend on its place in the corpus
    assert convert_corpus(texts[::-1], seed=1, keywords=keywords) == first[::-1]


def test_a_text_without_patterns_passes_through_unchanged():
    plain = "Cells were counted twice. Counts agreed."  # no title, no connector, fewer than four sentences
    assert reading_comprehension(plain) == plain
    config = AdaptLLMConfig(kinds=("nli", "paraphrase", "common_reason"))
    long_plain = " ".join(f"Sample {i} was stored at minus eighty degrees for later analysis." for i in range(6))
    assert reading_comprehension(long_plain, config) == long_plain


def test_kinds_and_caps_are_respected(abstracts, keywords):
    only_nli = AdaptLLMConfig(kinds=("nli",), max_per_label=1)
    tight = AdaptLLMConfig(max_tasks=2)
    for text in abstracts[:100]:
        tasks = mine_tasks(text, only_nli, text_rng(text, 0), "A title", keywords)
        assert {t.kind for t in tasks} <= {"nli"}
        assert max(Counter(t.label for t in tasks).values(), default=0) <= 1
        assert len(mine_tasks(text, tight, text_rng(text, 0), "A title", keywords)) <= 2


@pytest.mark.parametrize("field, value", [("kinds", ("nli", "poetry")), ("kinds", ["nli"]), ("max_tasks", -1),
                                          ("max_per_label", 1.5), ("domain", "")])
def test_invalid_config_names_its_field(field, value):
    with pytest.raises(ValueError, match=f"task.adaptllm.{field}"):
        AdaptLLMConfig(**{field: value})


# ------------------------------------------------------------------------------ pattern units

LONG_A = "The treatment group showed a marked reduction in systolic blood pressure after six weeks."
LONG_B = "the intervention can be recommended for patients with moderate hypertension in primary care."


@pytest.mark.parametrize("connector, label, verdict", [("Therefore", "entail", "Yes"),
                                                       ("However", "contradict", "No"),
                                                       ("Moreover", "neutral", "Maybe")])
def test_nli_label_follows_the_connector(connector, label, verdict):
    text = f"{LONG_A} {connector}, {LONG_B}"
    (task,) = mine_tasks(text, AdaptLLMConfig(kinds=("nli",)), random.Random(0))
    assert (task.label, task.answer, task.evidence) == (label, verdict, (LONG_A, LONG_B[:-1] + "."))
    assert LONG_B[0].upper() + LONG_B[1:] in task.question


def test_cause_effect_and_effect_cause():
    config = AdaptLLMConfig(kinds=("common_reason",))
    (forward,) = mine_tasks(f"{LONG_A} As a result, {LONG_B}", config, random.Random(0))
    assert forward.label == "cause-effect" and forward.answer == LONG_B[0].upper() + LONG_B[1:]
    sentence = "Enrolment was stopped early in the second trial because the interim analysis showed clear harm."
    (backward,) = mine_tasks(sentence, config, random.Random(0))
    assert backward.label == "effect-cause"
    assert backward.answer == "The interim analysis showed clear harm"
    assert backward.evidence == ("Enrolment was stopped early in the second trial",
                                 "the interim analysis showed clear harm")
    assert mine_tasks("Deaths due to sepsis were rare in this cohort of patients.", config, random.Random(0)) == []


def test_paraphrase_definition_keywords_and_completion():
    similar = mine_tasks(f"{LONG_A} In other words, {LONG_B}", AdaptLLMConfig(kinds=("paraphrase",)), random.Random(0))
    assert [(t.label, t.answer) for t in similar] == [("similar", LONG_B[0].upper() + LONG_B[1:])]
    definition = "Resistant hypertension is defined as blood pressure above goal despite three drugs."
    keyword_sentence = "Echocardiography showed ventricular hypertrophy and diastolic dysfunction."
    words = mine_tasks(f"{definition} {keyword_sentence}", AdaptLLMConfig(kinds=("word2text",)), random.Random(0),
                       keywords=frozenset({"echocardiography", "ventricular", "hypertrophy", "diastolic"}))
    assert {(t.label, t.answer) for t in words} == {
        ("definition", "blood pressure above goal despite three drugs"), ("keywords", keyword_sentence)}
    four = ["First sentence here.", "Second sentence here.", "Third sentence here.", "Fourth sentence here."]
    (completion,) = mine_tasks(" ".join(four), AdaptLLMConfig(kinds=("completion",)), random.Random(0))
    i = four.index(completion.answer)
    assert i >= 1 and completion.evidence == (four[i - 1], four[i])
    assert mine_tasks(" ".join(four[:3]), AdaptLLMConfig(kinds=("completion",)), random.Random(0)) == []


def test_sentences_are_verbatim_and_not_cut_at_abbreviations():
    text = ("The lace plant (A. madagascariensis) forms holes, e.g. in window stage leaves. "
            "Cells die by PCD (Gunawardena et al. 2004). Is it regulated? Yes!")
    sentences = split_sentences(text)
    assert sentences == ["The lace plant (A. madagascariensis) forms holes, e.g. in window stage leaves.",
                         "Cells die by PCD (Gunawardena et al. 2004).", "Is it regulated?", "Yes!"]
    assert all(s in text for s in sentences)


# ---------------------------------------------------------------------------- keywords and mix

def test_domain_keywords_are_frequent_in_domain_and_absent_from_general(keywords, abstracts):
    assert {"myocardial", "randomized"} & keywords and "patients" not in keywords  # "patients" is common in C4
    assert all(len(w) >= 8 and sum(w in a.lower() for a in abstracts) >= 3 for w in list(keywords)[:50])
    toy = domain_keywords(["angiography done", "angiography again", "angiography thrice", "stenosis once"],
                          ["general angiography news"], min_chars=8, min_documents=1)
    assert toy == frozenset({"stenosis"})


def test_mix_with_instructions_ratio_and_determinism():
    domain = [f"domain {i}" for i in range(10)]
    instructions = [f"instruction {i}" for i in range(3)]
    mixed = mix_with_instructions(domain, instructions, ratio=1.0, seed=0)
    assert sorted(t for t in mixed if t.startswith("domain")) == sorted(domain)
    used = Counter(t for t in mixed if t.startswith("instruction"))
    assert sum(used.values()) == 10 and max(used.values()) - min(used.values()) <= 1  # epochs of a permutation
    assert mix_with_instructions(domain, instructions, 1.0, seed=0) == mixed
    assert sorted(mix_with_instructions(domain, instructions, 0.0, seed=0)) == sorted(domain)
    with pytest.raises(ValueError):
        mix_with_instructions(domain, [], 0.5, seed=0)
