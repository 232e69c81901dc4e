"""The fine-tuning data of Section 5.2 as examples a supervised task can train on.

The paper fine-tunes LLaMA-2 7B on three tasks (Section 5.2.1, Table 1, hyperparameters in
Table 5): instruction tuning on Tülu v2 (326K conversations, scored by MMLU), mathematical
reasoning on MetaMathQA (395K, scored by GSM8K and MATH) and continual pretraining on PubMed
abstracts made into reading comprehension by AdaptLLM (scored by PubMedQA and others, Appendix C).
The hub datasets are read by functions that take a ``load_dataset``-like callable, so the same
code runs on local stand-ins; the offline data gives the ``mini`` versions: GSM8K train rewritten
in MetaMathQA's answer style, 100 Alpaca instructions, and PubMedQA-L's 1,000 abstracts and
expert-labelled questions. Which local items are held out for evaluation is one rule
(:func:`is_heldout`: every fifth in a fixed order) that lm_eval_tasks/utils.py imports from here,
with the prompts and the "The answer is: X" reader, so training never sees a scored item.

An example is a tuple of :class:`Segment`. A plain (prompt, response) pair is two segments; a
multi-turn conversation alternates untrained text (system and user turns, role headers) with
trained assistant turns, so every assistant turn is learned, not only the last (open-instruct's
masking, which Tülu v2 was trained with). A trainable segment is always closed by EOS, which is
trained too: the model learns where its answer ends.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from experiments.data.adaptllm import AdaptLLMConfig, convert_corpus, domain_keywords, mix_with_instructions
from experiments.data.columns import require_columns
from experiments.data.offline import DEFAULT_DATA_ROOT, verify_files

GSM8K_FILES = {"train": "finetune/gsm8k_train.jsonl", "test": "finetune/gsm8k_test.jsonl"}
ALPACA_FILE = "finetune/alpaca_tiny.json"
PUBMEDQA_FILE = "finetune/pubmedqa_ori_pqal.json"
TULU_V2 = "allenai/tulu-v2-sft-mixture"
METAMATHQA = "meta-math/MetaMathQA"


# ------------------------------------------------------------------------------------ examples

@dataclass(frozen=True)
class Segment:
    """A piece of an example's text; the loss covers a trainable piece and the EOS after it."""

    text: str
    trainable: bool


Example = tuple[Segment, ...]


def pair_example(prompt: str, response: str) -> Example:
    """The two segments of a (prompt, response) pair: loss on the response and its EOS only."""
    return (Segment(prompt, False), Segment(response, True))


def as_example(item: Example | tuple[str, str]) -> Example:
    """Either form accepted by the tasks: a segment tuple, or a (prompt, response) pair of strings."""
    if len(item) == 2 and all(isinstance(part, str) for part in item):
        return pair_example(*item)
    if not item or not all(isinstance(part, Segment) for part in item):
        raise TypeError(f"an example is a (prompt, response) pair of str or a tuple of Segment, got {item!r}")
    return tuple(item)


# --------------------------------------------------------------------------- held-out rule

HELDOUT_EVERY = 5  # item i (in a fixed order) is held out for evaluation iff i % HELDOUT_EVERY == 0


def is_heldout(index: int, every: int = HELDOUT_EVERY) -> bool:
    """The repo's one held-out rule: every ``every``-th item of a fixed order, from the first.

    Training (experiments/tasks/finetune.py) and lm-eval (lm_eval_tasks/utils.py) both split with it,
    so no item a benchmark scores is ever trained on.
    """
    return index % every == 0


def split_heldout(n_items: int, every: int = HELDOUT_EVERY) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of ``n_items`` under :func:`is_heldout`: sorted, disjoint, complete."""
    if not isinstance(every, int) or every < 2:
        raise ValueError(f"every must be an integer >= 2 (1 would hold out everything), got {every!r}")
    return ([i for i in range(n_items) if not is_heldout(i, every)],
            [i for i in range(n_items) if is_heldout(i, every)])


# --------------------------------------------------------------------------- Tülu v2 (hub)

TULU_ROLES = ("system", "user", "assistant")


def tulu_example(messages: Sequence[dict]) -> Example | None:
    """A Tülu v2 conversation in open-instruct's chat format, loss on every assistant turn.

    Text: ``<|user|>\\n{user}\\n<|assistant|>\\n{assistant}</s>\\n<|user|>\\n…`` (contents stripped,
    ``<|system|>`` likewise). The ``<|assistant|>\\n`` header is untrained, the reply and its EOS
    are trained. One difference from open-instruct: the newline after each EOS starts the next
    untrained segment instead of being trained. Messages after the last assistant turn carry no
    loss and are dropped; a conversation without one gives None.
    """
    segments: list[Segment] = []
    pending = ""
    for message in messages:
        role, content = message["role"], message["content"].strip()
        if role not in TULU_ROLES:
            raise ValueError(f"unknown Tülu role {role!r}; expected one of {TULU_ROLES}")
        if role == "assistant":
            segments += [Segment(pending + "<|assistant|>\n", False), Segment(content, True)]
            pending = "\n"
        else:
            pending += f"<|{role}|>\n{content}\n"
    return tuple(segments) or None


def load_tulu_v2(load_dataset: Callable, name: str = TULU_V2, split: str = "train") -> list[Example]:
    """Every Tülu v2 conversation (``messages`` rows) with at least one assistant turn."""
    rows = require_columns(load_dataset(name, split=split), ("messages.role", "messages.content"), name, split)
    examples = (tulu_example(row["messages"]) for row in rows)
    return [example for example in examples if example is not None]


# --------------------------------------------------------------------------- Alpaca prompts

# Stanford Alpaca's two prompts; the local file's `text` field is exactly prompt + output, which
# the tests check on all 100 rows.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n"
                            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def load_alpaca(data_root: str | Path = DEFAULT_DATA_ROOT, path: str = ALPACA_FILE) -> list[tuple[str, str]]:
    """(Alpaca prompt, output) pairs of a local Alpaca JSON list (instruction, input, output)."""
    (file,) = verify_files(data_root, [path])
    return [(alpaca_prompt(row["instruction"], row["input"]), row["output"]) for row in json.loads(file.read_text())]


def alpaca_eval_indices(n_items: int, every: int = HELDOUT_EVERY) -> list[int]:
    """Indices (file order) of the Alpaca examples ``alpaca_local_nll`` scores; training skips them."""
    return split_heldout(n_items, every)[1]


# ------------------------------------------------------------------------------- MetaMathQA

# MetaMath trains with Alpaca's no-input prompt, the question in place of the instruction (the
# brief's statement of its train_math.py, which our code index does not hold). Its evaluation
# prompt is different: eval_gsm8k.py and the README (meta-math/MetaMath) end the prompt with
# "### Response: Let's think step by step." and read the number after "The answer is: ".
METAMATH_PROMPT = ALPACA_PROMPT
METAMATH_EVAL_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: "
                        "Let's think step by step.")


def metamath_pair(query: str, response: str) -> tuple[str, str]:
    return METAMATH_PROMPT.format(instruction=query), response


def load_metamathqa(load_dataset: Callable, name: str = METAMATHQA, split: str = "train") -> list[tuple[str, str]]:
    """MetaMathQA's (query, response) rows as prompt/response pairs."""
    rows = require_columns(load_dataset(name, split=split), ("query", "response"), name, split)
    return [metamath_pair(row["query"], row["response"]) for row in rows]


# ------------------------------------------------------------------------------------ GSM8K

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = "####"


def load_gsm8k(split: str, data_root: str | Path = DEFAULT_DATA_ROOT) -> list[dict]:
    """Rows (``question``, ``answer``) of the local GSM8K ``train`` or ``test`` file."""
    if split not in GSM8K_FILES:
        raise ValueError(f"GSM8K split must be one of {tuple(GSM8K_FILES)}, got {split!r}")
    (file,) = verify_files(data_root, [GSM8K_FILES[split]])
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def gsm8k_to_metamath(answer: str) -> str:
    """A GSM8K solution in MetaMathQA's answer style, so the mini math task trains like MetaMath.

    The ``<<48/2=24>>`` calculator annotations go (they are tool calls, not text a model should
    write) and the final ``#### N`` line becomes ``The answer is: N``.
    """
    body, sep, final = answer.rpartition(_GSM8K_FINAL)
    if not sep:
        raise ValueError(f"a GSM8K answer ends with '#### N'; got {answer[-80:]!r}")
    return f"{_CALCULATOR.sub('', body).rstrip()}\nThe answer is: {final.strip()}"


def gsm8k_pairs(rows: Iterable[dict]) -> list[tuple[str, str]]:
    """(MetaMath prompt, MetaMath-style answer) pairs of GSM8K rows."""
    return [metamath_pair(row["question"], gsm8k_to_metamath(row["answer"])) for row in rows]


# -------------------------------------------------------------------------- answer extraction
# The repo's one "The answer is: X" reader: lm_eval_tasks/utils.py scores GSM8K and MATH with it.

_ANSWER_MARK = re.compile(r"The answer is\s*:?", re.IGNORECASE)
# a leading number: sign, thousands commas only in groups of three (so "1, 2" is not 12),
# decimals ("7.", ".5"), an optional "/ denominator"
_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?")
_LATEX_FRAC = re.compile(r"([-+]?)\\[dt]?frac\{\s*([-+]?[\d.]+)\s*\}\{\s*([-+]?[\d.]+)\s*\}")


def extract_metamath_answer(completion: str) -> str | None:
    """The text after the last "The answer is:" of ``completion``, to the end of that line, as
    written less a trailing period; None when the mark is missing or nothing follows it.

    MetaMath's answers end with "The answer is: X" and its scorers read X (eval_gsm8k.py and
    eval_math.py of meta-math/MetaMath). Kept as written because MATH compares symbolic answers
    ("3\\sqrt{2}", "(1,2)"); GSM8K compares numbers through :func:`normalize_number`.
    """
    marks = list(_ANSWER_MARK.finditer(completion))
    if not marks:
        return None
    answer = completion[marks[-1].end():].strip().split("\n", 1)[0].strip().rstrip(".").strip()
    return answer or None


def normalize_number(text: str | None) -> str | None:
    """The exact value of the number ``text`` starts with, canonical; None if it starts with none.

    "$1,234.50", "1234.5", "2469/2" and "\\frac{2469}{2}" all give "2469/2"; "-3.0" gives "-3".
    Dollar signs and thousands commas are ignored, and so is whatever follows the number (units,
    words, "%", a period). An integer or a reduced fraction p/q, so equal values compare equal
    as strings (MetaMath's own scorer rounds to an integer, which agrees on GSM8K's answers).
    """
    if text is None:
        return None
    cleaned = text.replace("\\$", "").replace("$", "").replace("\u2212", "-").strip()
    latex = _LATEX_FRAC.match(cleaned)
    if latex:
        numerator, denominator = latex.group(1) + latex.group(2), latex.group(3)
    else:
        number = _NUMBER.match(cleaned)
        if not number:
            return None
        numerator, _, denominator = number.group(0).partition("/")
    try:
        value = Fraction(numerator.replace(",", "")) / Fraction(denominator or "1")
    except (ValueError, ZeroDivisionError):
        return None
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def extract_gsm8k_answer(answer: str) -> str | None:
    """The normalised number after GSM8K's final "#### "; None when absent."""
    _, sep, final = answer.rpartition(_GSM8K_FINAL)
    return normalize_number(final) if sep else None


# -------------------------------------------------------------------------------- PubMedQA-L

PUBMEDQA_DECISIONS = ("yes", "no", "maybe")


@dataclass(frozen=True)
class PubMedQAItem:
    """One PubMedQA-L record: the question is the article's title, the contexts its abstract
    without the conclusion, which is the long answer (Jin et al. 2019, Section 3)."""

    pmid: str
    question: str
    contexts: tuple[str, ...]
    long_answer: str
    decision: str


@dataclass(frozen=True)
class ChoiceExample:
    """A multiple-choice question: the option continuing ``prompt`` best is the prediction."""

    prompt: str
    options: tuple[str, ...]
    answer_index: int


def load_pubmedqa(data_root: str | Path = DEFAULT_DATA_ROOT, path: str = PUBMEDQA_FILE) -> list[PubMedQAItem]:
    """All PubMedQA-L items, ordered by PMID (so splits do not depend on the file's key order)."""
    (file,) = verify_files(data_root, [path])
    raw = json.loads(file.read_text())
    items = [PubMedQAItem(pmid, row["QUESTION"], tuple(row["CONTEXTS"]), row["LONG_ANSWER"], row["final_decision"])
             for pmid, row in raw.items()]
    bad = [item.pmid for item in items if item.decision not in PUBMEDQA_DECISIONS]
    if bad:
        raise ValueError(f"PubMedQA items {bad[:5]} have a final_decision outside {PUBMEDQA_DECISIONS}")
    return sorted(items, key=lambda item: int(item.pmid))


def pubmedqa_ids(data: Iterable[str]) -> list[str]:
    """PMIDs (the keys of PubMedQA-L's ``{pmid: record}``, or any iterable of them) in numeric
    order: the fixed order of the held-out rule, whatever the file's key order."""
    return sorted(data, key=int)


def pubmedqa_eval_ids(data: Iterable[str], every: int = HELDOUT_EVERY) -> list[str]:
    """PMIDs evaluated by ``pubmedqa_local`` and ``pubmed_abstracts_ppl`` (:func:`is_heldout` in
    numeric order: 200 of 1,000 at every=5). Continual pretraining must leave their abstracts
    out (:func:`pubmedqa_train_ids`), or the evaluation measures memorised text."""
    ids = pubmedqa_ids(data)
    return [ids[i] for i in split_heldout(len(ids), every)[1]]


def pubmedqa_train_ids(data: Iterable[str], every: int = HELDOUT_EVERY) -> list[str]:
    """The complement of :func:`pubmedqa_eval_ids`: the abstracts training may use."""
    ids = pubmedqa_ids(data)
    return [ids[i] for i in split_heldout(len(ids), every)[0]]


def split_pubmedqa(items: Sequence[PubMedQAItem],
                   every: int = HELDOUT_EVERY) -> tuple[list[PubMedQAItem], list[PubMedQAItem]]:
    """(abstract items, question items) by :func:`pubmedqa_train_ids` / :func:`pubmedqa_eval_ids`.

    The training side gives continual-pretraining text (its abstracts); the held-out side is
    what lm-eval scores (questions, abstracts for perplexity) and the in-loop evaluation data.
    """
    by_id = {item.pmid: item for item in items}
    if len(by_id) != len(items):
        raise ValueError("PubMedQA items repeat a PMID; the held-out rule needs each once")
    return [by_id[i] for i in pubmedqa_train_ids(by_id, every)], [by_id[i] for i in pubmedqa_eval_ids(by_id, every)]


def pubmedqa_abstract(item: PubMedQAItem, with_conclusion: bool = True) -> str:
    """The abstract as raw domain text: the context sections, then (by default) the conclusion.

    With the conclusion the text is the whole abstract, as a PubMed abstract in the Pile is; only
    training items are used this way, so the conclusions of evaluated questions stay unseen.
    """
    parts = [*item.contexts, item.long_answer] if with_conclusion else list(item.contexts)
    return " ".join(part.strip() for part in parts if part.strip())


def pubmedqa_prompt(item: PubMedQAItem) -> str:
    """PubMedQA's reasoning-required setting: the contexts and the question, no conclusion."""
    context = " ".join(part.strip() for part in item.contexts)
    return f"Context: {context}\nQuestion: {item.question}\nAnswer (yes, no or maybe):"


def pubmedqa_choice(item: PubMedQAItem) -> ChoiceExample:
    return ChoiceExample(pubmedqa_prompt(item), PUBMEDQA_DECISIONS, PUBMEDQA_DECISIONS.index(item.decision))



# ------------------------------------------------------------------ the mini tasks' data (offline)

def first_n(items: Sequence, n: int, what: str) -> list:
    """The first ``n`` of ``items`` (the in-loop evaluation subset); more than there are is an error."""
    if n > len(items):
        raise ValueError(f"task.n_eval={n} exceeds the {len(items)} {what}")
    return list(items[:n])


def gsm8k_mini(data_root: str | Path = DEFAULT_DATA_ROOT, n_eval: int = 200):
    """(training pairs, held-out pairs) of the mini math task: GSM8K train in MetaMath's format; the
    first ``n_eval`` problems of the test file (which never overlaps the training file) held out."""
    heldout = first_n(load_gsm8k("test", data_root), n_eval, "GSM8K test problems")
    return gsm8k_pairs(load_gsm8k("train", data_root)), gsm8k_pairs(heldout)


def alpaca_mini(data_root: str | Path = DEFAULT_DATA_ROOT, n_eval: int = 10, every: int = HELDOUT_EVERY):
    """(training pairs, held-out pairs) of the mini instruction task: the 100 Alpaca examples less
    every ``every``-th (the ones ``alpaca_local_nll`` scores: 20 of 100, :func:`is_heldout`); the
    first ``n_eval`` of those held out."""
    pairs = load_alpaca(data_root)
    train, heldout = split_heldout(len(pairs), every)
    return [pairs[i] for i in train], first_n([pairs[i] for i in heldout], n_eval, "held-out Alpaca examples")


def pubmed_texts(data_root: str | Path = DEFAULT_DATA_ROOT, every: int = HELDOUT_EVERY,
                 adaptllm: AdaptLLMConfig | None = AdaptLLMConfig(), general_texts: Sequence[str] = (),
                 instruction_ratio: float = 0.0, seed: int = 0):
    """(training texts, held-out abstracts, held-out questions) of the mini biomedicine task.

    Training texts are the abstracts of the training items (800 of PubMedQA-L's 1,000, the
    complement of what ``pubmedqa_local`` and ``pubmed_abstracts_ppl`` score), as AdaptLLM reading
    comprehension (titles = the items' questions, which PubMedQA takes from the article titles;
    keywords from ``general_texts``), mixed with the training Alpaca instructions at
    ``instruction_ratio``; ``adaptllm=None`` keeps the raw abstracts. Held-out items (every
    ``every``-th PMID in numeric order) give only evaluation data.
    """
    train, heldout = split_pubmedqa(load_pubmedqa(data_root), every)
    abstracts = [pubmedqa_abstract(item) for item in train]
    texts = abstracts
    if adaptllm is not None:
        keywords = domain_keywords(abstracts, general_texts) if general_texts else frozenset()
        texts = convert_corpus(abstracts, adaptllm, seed, [item.question for item in train], keywords)
    if instruction_ratio:
        alpaca = load_alpaca(data_root)
        instructions = [alpaca[i][0] + alpaca[i][1] for i in split_heldout(len(alpaca), every)[0]]
        texts = mix_with_instructions(texts, instructions, instruction_ratio, seed)
    return texts, [pubmedqa_abstract(item) for item in heldout], [pubmedqa_choice(item) for item in heldout]
