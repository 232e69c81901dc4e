"""Fine-tuning data (Section 5.2): prompt formats checked on the real local files, answer
extraction on every GSM8K solution and on tricky strings, chat segments, disjoint splits."""

from __future__ import annotations

import json

import pytest

from experiments.data.finetune import (ALPACA_FILE, METAMATH_EVAL_PROMPT, PUBMEDQA_DECISIONS, Segment,
                                       alpaca_eval_indices, as_example, extract_gsm8k_answer,
                                       extract_metamath_answer, gsm8k_pairs, gsm8k_to_metamath, is_heldout,
                                       load_alpaca, load_gsm8k, load_metamathqa, load_pubmedqa, load_tulu_v2,
                                       normalize_number, pair_example, pubmedqa_abstract, pubmedqa_choice,
                                       pubmedqa_eval_ids, pubmedqa_prompt, pubmedqa_train_ids, split_heldout,
                                       split_pubmedqa, tulu_example)
from experiments.data.offline import DEFAULT_DATA_ROOT, OfflineDataError


@pytest.fixture(scope="module")
def gsm8k_rows():
    return load_gsm8k("train") + load_gsm8k("test")


@pytest.fixture(scope="module")
def pubmedqa():
    return load_pubmedqa()


# ------------------------------------------------------------------------------------- Alpaca

def test_alpaca_prompt_plus_output_is_the_files_own_text_field():
    rows = json.loads((DEFAULT_DATA_ROOT / ALPACA_FILE).read_text())
    pairs = load_alpaca()
    assert len(pairs) == len(rows) == 100
    assert sum("### Input:" in p for p, _ in pairs) == sum(bool(r["input"]) for r in rows) == 46
    assert all(prompt + output == row["text"] for (prompt, output), row in zip(pairs, rows))


def test_a_damaged_data_root_fails_loudly(tmp_path):
    with pytest.raises(OfflineDataError, match="SHA256SUMS"):
        load_alpaca(tmp_path)


# ------------------------------------------------------------------------------ GSM8K / MetaMath

def test_gsm8k_in_metamath_style_exact_first_example(gsm8k_rows):
    prompt, response = gsm8k_pairs(gsm8k_rows[:1])[0]
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                      "the request.\n\n### Instruction:\nNatalia sold clips to 48 of her friends in April, and then "
                      "she sold half as many clips in May. How many clips did Natalia sell altogether in April and "
                      "May?\n\n### Response:\n")
    assert response == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April "
                        "and May.\nThe answer is: 72")


def test_every_gsm8k_solution_converts_and_keeps_its_answer(gsm8k_rows):
    assert len(gsm8k_rows) == 7473 + 1319
    for row in gsm8k_rows:
        converted = gsm8k_to_metamath(row["answer"])
        assert "<<" not in converted and ">>" not in converted and "####" not in converted
        assert converted.rsplit("\n", 1)[1].startswith("The answer is: ")
        gold = extract_gsm8k_answer(row["answer"])
        assert gold is not None and normalize_number(extract_metamath_answer(converted)) == gold


def test_gsm8k_answers_with_thousands_commas_are_read_as_numbers(gsm8k_rows):
    with_commas = [r["answer"] for r in gsm8k_rows if "," in r["answer"].rpartition("####")[2]]
    assert with_commas  # e.g. "#### 1,200"
    assert all(extract_gsm8k_answer(a) == a.rpartition("####")[2].strip().replace(",", "") for a in with_commas)


def test_a_gsm8k_answer_without_its_final_line_is_refused():
    with pytest.raises(ValueError, match="####"):
        gsm8k_to_metamath("No final line here.")
    assert extract_gsm8k_answer("No final line here.") is None


# (completion, the answer as written, its number): one table for the extractor lm-eval scores with
# (lm_eval_tasks/utils.py imports it from experiments/data/finetune.py)
ANSWERS = [
    ("So she pays 5 + 3 = 8.\nThe answer is: 8", "8", "8"),
    ("So she makes $18 a day.\nThe answer is: $18.", "$18", "18"),
    ("The answer is: $1,234.", "$1,234", "1234"),
    ("The answer is: \\$18", "\\$18", "18"),
    ("The answer is: 18 dollars.", "18 dollars", "18"),
    ("The answer is: 18 dollars\n\n### Instruction:\nnext", "18 dollars", "18"),
    ("first The answer is: 3, then the answer is: 1,234.50", "1,234.50", "2469/2"),
    ("The answer is: -7", "-7", "-7"),
    ("The answer is: -7.0", "-7.0", "-7"),
    ("The answer is: \u22127", "\u22127", "-7"),
    ("The answer is:\u22124", "\u22124", "-4"),
    ("The answer is: 3/4", "3/4", "3/4"),
    ("The answer is: 6/8.", "6/8", "3/4"),
    ("The answer is: 3/6", "3/6", "1/2"),
    ("The answer is: \\frac{3}{4}", "\\frac{3}{4}", "3/4"),
    ("The answer is: \\dfrac{-1}{2}", "\\dfrac{-1}{2}", "-1/2"),
    ("The answer is: 0.50", "0.50", "1/2"),
    ("The answer is: 12.0", "12.0", "12"),
    ("The answer is: .5", ".5", "1/2"),
    ("The answer is: 50%", "50%", "50"),
    ("the answer is 42", "42", "42"),
    ("The answer is: 5\nThe answer is: 7.", "7", "7"),          # the last one counts
    ("The answer is: 7\nSome trailing text", "7", "7"),
    ("The answer is: 1, 2", "1, 2", "1"),                       # "1, 2" is not twelve
    ("The answer is: (1,2)", "(1,2)", None),                    # symbolic answers (MATH) stay as written
    ("The answer is: 3\\sqrt{2}", "3\\sqrt{2}", "3"),
    ("The answer is: \\sqrt{2}.", "\\sqrt{2}", None),
    ("The answer is: ", None, None),
    ("She makes 18 dollars.", None, None),                      # no mark: MetaMath scores it wrong
    ("no final answer in this text", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("text, written, number", ANSWERS)
def test_extract_metamath_answer_and_its_number(text, written, number):
    assert extract_metamath_answer(text) == written
    assert normalize_number(extract_metamath_answer(text)) == number


@pytest.mark.parametrize("text, expected", [
    ("72", "72"), ("1,000,000", "1000000"), ("$5.00", "5"), ("-0.25", "-1/4"), ("10/4", "5/2"), ("3 / 4", "3/4"),
    (" 7. ", "7"), ("1, 2", "1"), ("2469/2", "2469/2"), ("\\frac{2469}{2}", "2469/2"), ("-\\frac{1}{2}", "-1/2"),
    ("abc", None), ("dollars", None), ("1/0", None), ("", None), (None, None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_metamath_hub_loader_takes_a_stand_in_and_uses_the_training_prompt():
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [{"query": "What is 2+2?", "response": "2+2=4.\nThe answer is: 4", "type": "GSM_AnsAug"}]

    (prompt, response), = load_metamathqa(fake_load_dataset)
    assert calls == [("meta-math/MetaMathQA", "train")]
    assert prompt.endswith("### Instruction:\nWhat is 2+2?\n\n### Response:\n")
    assert extract_metamath_answer(response) == "4"
    assert METAMATH_EVAL_PROMPT.endswith("### Response: Let's think step by step.")  # eval differs from training


# --------------------------------------------------------------------------------------- Tülu

def test_tulu_conversation_trains_every_assistant_turn_in_open_instruct_format():
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " Hi"},
                {"role": "assistant", "content": "Hello!\n"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "thanks"}]
    segments = tulu_example(messages)
    assert segments == (Segment("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n", False),
                        Segment("Hello!", True),
                        Segment("\n<|user|>\n2+2?\n<|assistant|>\n", False),
                        Segment("4", True))  # the unanswered last user turn is dropped
    rendered = "".join(s.text + ("</s>" if s.trainable else "") for s in segments)
    assert rendered == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>"
                        "\n<|user|>\n2+2?\n<|assistant|>\n4</s>")


def test_tulu_without_an_assistant_turn_is_skipped_and_unknown_roles_refused():
    assert tulu_example([{"role": "user", "content": "anyone?"}]) is None
    with pytest.raises(ValueError, match="role"):
        tulu_example([{"role": "tool", "content": "x"}])

    def fake_load_dataset(name, split):
        assert (name, split) == ("allenai/tulu-v2-sft-mixture", "train")
        return [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                {"messages": [{"role": "user", "content": "unanswered"}]}]

    assert load_tulu_v2(fake_load_dataset) == [(Segment("<|user|>\nq\n<|assistant|>\n", False), Segment("a", True))]


def test_as_example_accepts_pairs_and_segment_tuples_only():
    assert as_example(("p", "r")) == pair_example("p", "r") == (Segment("p", False), Segment("r", True))
    segments = (Segment("a", False), Segment("b", True))
    assert as_example(segments) == segments
    with pytest.raises(TypeError):
        as_example(("only one",))


# ------------------------------------------------------------------------------------- splits

def test_every_fifth_item_is_held_out():
    train, heldout = split_heldout(12)
    assert heldout == [0, 5, 10] and train == [1, 2, 3, 4, 6, 7, 8, 9, 11]
    assert heldout == [i for i in range(12) if is_heldout(i)] == alpaca_eval_indices(12)
    assert split_heldout(12, every=4)[1] == [0, 4, 8]
    for every in (0, 1):
        with pytest.raises(ValueError, match="every"):
            split_heldout(10, every)


def test_alpaca_holds_out_twenty_of_its_hundred_examples():
    train, heldout = split_heldout(len(load_alpaca()))
    assert len(train) == 80 and heldout == alpaca_eval_indices(100) == list(range(0, 100, 5))


# ------------------------------------------------------------------------------------ PubMedQA

def test_pubmedqa_items_are_the_1000_labelled_questions(pubmedqa):
    assert len(pubmedqa) == 1000 and len({i.pmid for i in pubmedqa}) == 1000
    assert [int(i.pmid) for i in pubmedqa] == sorted(int(i.pmid) for i in pubmedqa)
    counts = {d: sum(i.decision == d for i in pubmedqa) for d in PUBMEDQA_DECISIONS}
    assert counts == {"yes": 552, "no": 338, "maybe": 110}


def test_pubmedqa_split_is_the_every_fifth_pmid_rule(pubmedqa):
    train, heldout = split_pubmedqa(pubmedqa)
    ids = sorted((item.pmid for item in pubmedqa), key=int)
    assert [i.pmid for i in heldout] == pubmedqa_eval_ids(ids) == ids[::5]
    assert [i.pmid for i in train] == pubmedqa_train_ids(ids)
    assert len(train) == 800 and len(heldout) == 200
    assert split_pubmedqa(pubmedqa[::-1]) == (train, heldout)  # the items' order does not matter


def heldout_sections(heldout) -> list[str]:
    """Every context section and conclusion of ``heldout`` of at least 50 characters. Some abstracts
    share one-line design sections ("None.", "Cross-sectional.", "Randomized controlled trial."):
    those recur across articles; every substantive section must be unseen."""
    sections = [c.strip() for item in heldout for c in (*item.contexts, item.long_answer)]
    substantive = [c for c in sections if len(c) >= 50]
    assert len(substantive) > 0.95 * len(sections)  # the filter drops only those few
    return substantive


def test_no_evaluated_abstract_is_in_the_training_text(pubmedqa):
    train, heldout = split_pubmedqa(pubmedqa)
    corpus = "\n".join(pubmedqa_abstract(item) for item in train)
    assert not [c for c in heldout_sections(heldout) if c in corpus]


def test_pubmedqa_question_hides_the_conclusion_and_keeps_the_label(pubmedqa):
    item = pubmedqa[0]
    prompt = pubmedqa_prompt(item)
    assert item.question in prompt and all(c.strip() in prompt for c in item.contexts)
    assert item.long_answer not in prompt
    choice = pubmedqa_choice(item)
    assert choice.options == ("yes", "no", "maybe") and choice.options[choice.answer_index] == item.decision
    abstract = pubmedqa_abstract(item)
    assert abstract.endswith(item.long_answer.strip()) and item.contexts[0].strip() in abstract
    assert item.long_answer not in pubmedqa_abstract(item, with_conclusion=False)
