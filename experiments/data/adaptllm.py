"""AdaptLLM's reading-comprehension texts for continual pretraining (Section 5.2.1, Appendix C).

The paper adapts LLaMA-2 to biomedicine and finance "complemented by data preprocessing methods
from AdaptLLM" (Cheng et al. 2023, "Adapting Large Language Models via Reading Comprehension",
arXiv 2309.09530). AdaptLLM keeps each raw domain text and appends tasks mined from the text
itself with patterns, so continued pretraining teaches domain knowledge without losing the
ability to answer prompts (its Section 3, Fig. 2, Table 1):

- summarization: the title from the text (here when a title is given);
- word-to-text: domain keywords -> a sentence of the text that uses them; a term -> its
  definition ("X is defined as Y");
- natural language inference: two consecutive sentences joined by a connector; "Therefore,"
  means entailment, "However," contradiction, "Moreover," neutral;
- common-sense reasoning: cause -> effect across "Therefore," / "As a result,", and
  effect -> cause inside a sentence around "because", "due to", "owing to";
- paraphrase detection: a sentence and the next one after "In other words," / "Similarly,"
  (similar) or "However," / "In contrast," (different), asked as generation;
- text completion: a sentence of a text with at least four -> the sentence that follows it.

As in AdaptLLM's released code, tasks of one kind are grouped (few-shot style), at most two per
pattern, the kinds are shuffled, and the text comes first. The wording of the questions is ours.
Two deliberate differences: AdaptLLM splits the text itself for text completion (the question
sits between the halves) and puts some title tasks before it; here the raw text is always kept
whole and first, so the domain text reads as in the raw corpus and a text with nothing to mine
passes through unchanged. Its word-to-text keywords come from a domain SentencePiece vocabulary
minus the general one; :func:`domain_keywords` does the same with word counts.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

KINDS = ("summarize", "word2text", "nli", "common_reason", "paraphrase", "completion")

_INTROS = ("\n\nAnswer questions about the {domain} article above.\n\n",
           "\n\nNow answer these questions about the article:\n\n",
           "\n\nUse the {domain} text above to answer the following.\n\n")

# Sentence-initial connectors (followed by a comma) and what they say about the previous sentence.
_ENTAIL = ("Therefore", "Thus", "Hence", "Accordingly", "Consequently", "As a result", "For this reason")
_CONTRADICT = ("However", "In contrast", "On the contrary", "Conversely", "Nevertheless")
_NEUTRAL = ("Moreover", "Furthermore", "In addition", "Additionally", "Also")
_SIMILAR = ("In other words", "That is", "Namely", "Similarly", "Likewise", "Equally")
_NLI = {"entail": (_ENTAIL, "Yes"), "contradict": (_CONTRADICT, "No"), "neutral": (_NEUTRAL, "Maybe")}
_CAUSAL_LINKS = ("because of", "because", "due to", "owing to", "as a result of", "on account of")

_ABBREVIATIONS = ("e.g.", "i.e.", "et al.", "vs.", "Fig.", "Figs.", "approx.", "ca.", "cf.", "Dr.")
_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[\"'])")
# a full stop that ends an abbreviation or an initial ("A. madagascariensis") ends no sentence
_NO_BOUNDARY = re.compile(r"(?:^|[\s(\[])(?:" + "|".join(map(re.escape, _ABBREVIATIONS)) + r"|[A-Z]\.)$")
_WORD = re.compile(r"[A-Za-z][A-Za-z-]*[A-Za-z]")
_MIN_CLAUSE_CHARS = 20          # each side of "because"/"due to", and a definition
_WORD2TEXT_KEYWORDS = 3         # AdaptLLM asks for at least three domain keywords per sentence
_WORD2TEXT_MAX_CHARS = 400      # and a sentence short enough to be one answer (it uses 100 tokens)
_COMPLETION_MIN_SENTENCES = 4   # AdaptLLM's text-completion condition


@dataclass(frozen=True)
class AdaptLLMConfig:
    """Which tasks to mine and how many; validated on construction (names ``task.adaptllm.<field>``)."""

    kinds: tuple[str, ...] = KINDS
    max_tasks: int = 8             # per text, after at most max_per_label per pattern
    max_per_label: int = 2         # AdaptLLM keeps at most two examples per sub-category
    min_sentence_chars: int = 50   # AdaptLLM's patterns ask for 50+ characters on each side
    domain: str = "biomedicine"

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not isinstance(self.kinds, tuple):
            raise ValueError(f"task.adaptllm.kinds must be a tuple of {KINDS}, got {self.kinds!r}")
        for field in ("max_tasks", "max_per_label", "min_sentence_chars"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"task.adaptllm.{field} must be an integer >= 0, got {value!r}")
        if not isinstance(self.domain, str) or not self.domain:
            raise ValueError(f"task.adaptllm.domain must be a non-empty string, got {self.domain!r}")


@dataclass(frozen=True)
class MinedTask:
    """One question about a text; ``evidence`` holds the spans of the text it was built from."""

    kind: str
    label: str
    question: str
    answer: str
    evidence: tuple[str, ...]


# ------------------------------------------------------------------------------------ sentences

def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, each a verbatim substring; no split after an abbreviation or initial."""
    sentences, start = [], 0
    for boundary in _BOUNDARY.finditer(text):
        before = text[start:boundary.start()]
        if _NO_BOUNDARY.search(before):
            continue
        sentences.append(before.strip())
        start = boundary.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def _capitalised(clause: str) -> str:
    return clause[:1].upper() + clause[1:]


def _after_connector(sentence: str, connectors: Sequence[str]) -> tuple[str, str] | None:
    """(connector, rest) when ``sentence`` opens with one of ``connectors`` and a comma."""
    for connector in connectors:
        if sentence.startswith(connector + ","):
            return connector, sentence[len(connector) + 1:].strip()
    return None


def _linked_pairs(sentences: Sequence[str], connectors: Sequence[str], min_chars: int):
    """(previous sentence, connector, rest of next sentence) for each adjacent linked pair."""
    for first, second in zip(sentences, sentences[1:]):
        linked = _after_connector(second, connectors)
        if linked and len(first) >= min_chars and len(linked[1]) >= min_chars:
            yield first, linked[0], linked[1]


# ---------------------------------------------------------------------------------------- mining

def _mine_summarize(title, rng, domain, **_) -> list[MinedTask]:
    if not title:
        return []
    question = rng.choice((f"What is a title for this {domain} article?",
                           "Summarize the article above in one line.",
                           f"What was this {domain} text about?"))
    return [MinedTask("summarize", "title", question, title.strip(), ())]


def _mine_word2text(sentences, keywords, rng, domain, **_) -> list[MinedTask]:
    tasks = []
    for sentence in sentences:
        definition = re.fullmatch(r"(.{3,80}?)\s+(?:is|are)\s+defined as\s+(.+?)[.!?]?", sentence)
        if definition and len(definition.group(2)) >= _MIN_CLAUSE_CHARS:
            term, meaning = definition.groups()
            tasks.append(MinedTask("word2text", "definition", f"How is \"{term}\" defined?", meaning, (term, meaning)))
        present = sorted({w.lower() for w in _WORD.findall(sentence)} & keywords)
        if len(present) >= _WORD2TEXT_KEYWORDS and len(sentence) <= _WORD2TEXT_MAX_CHARS:
            concepts = ", ".join(rng.sample(present, _WORD2TEXT_KEYWORDS))
            question = rng.choice((f"Concepts: {concepts}\nWrite a sentence from the {domain} article using them all.",
                                   f"Which sentence of the article mentions these {domain} terms: {concepts}?"))
            tasks.append(MinedTask("word2text", "keywords", question, sentence, (sentence,)))
    return tasks


def _mine_nli(sentences, rng, min_chars, **_) -> list[MinedTask]:
    tasks = []
    for label, (connectors, verdict) in _NLI.items():
        for premise, _connector, rest in _linked_pairs(sentences, connectors, min_chars):
            hypothesis = _capitalised(rest)
            question = rng.choice((f"Premise: {premise}\nHypothesis: {hypothesis}\n"
                                   "Does the premise entail the hypothesis? Yes, no or maybe?",
                                   f"Sentence 1: {premise}\nSentence 2: {hypothesis}\n"
                                   "Does sentence 2 follow from sentence 1 (yes, no or maybe)?"))
            tasks.append(MinedTask("nli", label, question, verdict, (premise, rest)))
    return tasks


def _mine_common_reason(sentences, rng, min_chars, **_) -> list[MinedTask]:
    tasks = []
    for cause, _connector, effect in _linked_pairs(sentences, _ENTAIL, min_chars):
        question = rng.choice((f"What is a likely effect of the following?\n{cause}",
                               f"Given that \"{cause}\", what follows?"))
        tasks.append(MinedTask("common_reason", "cause-effect", question, _capitalised(effect), (cause, effect)))
    links = "|".join(re.escape(link) for link in _CAUSAL_LINKS)
    for sentence in sentences:
        split = re.fullmatch(rf"(.+?),?\s+(?:{links})\s+(.+?)[.!?]?", sentence)
        if split and min(len(split.group(1)), len(split.group(2))) >= _MIN_CLAUSE_CHARS:
            effect, cause = split.groups()
            question = rng.choice((f"What is the cause of the following?\n{effect}",
                                   f"Why is it that \"{effect}\"?"))
            tasks.append(MinedTask("common_reason", "effect-cause", question, _capitalised(cause), (effect, cause)))
    return tasks


def _mine_paraphrase(sentences, rng, min_chars, **_) -> list[MinedTask]:
    tasks = []
    for first, _connector, rest in _linked_pairs(sentences, _SIMILAR, min_chars):
        question = rng.choice((f"Say the following in other words, as the article does:\n{first}",
                               f"Write a sentence that restates or extends this one:\n{first}"))
        tasks.append(MinedTask("paraphrase", "similar", question, _capitalised(rest), (first, rest)))
    for first, _connector, rest in _linked_pairs(sentences, _CONTRADICT, min_chars):
        question = rng.choice((f"Write a sentence that contrasts with the following:\n{first}",
                               f"What does the article set against this statement?\n{first}"))
        tasks.append(MinedTask("paraphrase", "different", question, _capitalised(rest), (first, rest)))
    return tasks


def _mine_completion(sentences, rng, **_) -> list[MinedTask]:
    if len(sentences) < _COMPLETION_MIN_SENTENCES:
        return []
    cut = rng.randrange(1, len(sentences))
    previous, following = sentences[cut - 1], sentences[cut]
    question = rng.choice((f"How does the article continue after \"{previous}\"?",
                           f"Complete the passage with its next sentence:\n{previous}"))
    return [MinedTask("completion", "next-sentence", question, following, (previous, following))]


_MINERS = {"summarize": _mine_summarize, "word2text": _mine_word2text, "nli": _mine_nli,
           "common_reason": _mine_common_reason, "paraphrase": _mine_paraphrase, "completion": _mine_completion}


def text_rng(text: str, seed: int) -> random.Random:
    """A generator for one text: depends on (seed, text) only, not on the text's place in a corpus."""
    return random.Random(f"adaptllm|{seed}|{hashlib.sha256(text.encode()).hexdigest()}")


def mine_tasks(text: str, config: AdaptLLMConfig, rng: random.Random, title: str | None = None,
               keywords: frozenset[str] = frozenset()) -> list[MinedTask]:
    """The tasks appended to ``text``: grouped by kind (kinds in random order), capped as configured."""
    sentences = split_sentences(text)
    context = dict(sentences=sentences, title=title, keywords=keywords, rng=rng, domain=config.domain,
                   min_chars=config.min_sentence_chars)
    groups = []
    for kind in config.kinds:
        by_label: dict[str, list[MinedTask]] = {}
        for task in _MINERS[kind](**context):
            by_label.setdefault(task.label, []).append(task)
        kept = []
        for tasks in by_label.values():
            rng.shuffle(tasks)
            kept += tasks[:config.max_per_label]
        if kept:
            groups.append(kept)
    rng.shuffle(groups)
    return [task for group in groups for task in group][:config.max_tasks]


def render(text: str, tasks: Sequence[MinedTask], rng: random.Random, domain: str) -> str:
    """The raw text, then an introduction and the question/answer blocks (the text alone if none)."""
    if not tasks:
        return text
    intro = rng.choice(_INTROS).format(domain=domain)
    return text + intro + "\n\n".join(f"{task.question}\nAnswer: {task.answer}" for task in tasks)


def reading_comprehension(text: str, config: AdaptLLMConfig = AdaptLLMConfig(), seed: int = 0,
                          title: str | None = None, keywords: frozenset[str] = frozenset()) -> str:
    """``text`` as an AdaptLLM reading-comprehension text; the same (text, seed) gives the same output."""
    rng = text_rng(text, seed)
    tasks = mine_tasks(text, config, rng, title, keywords)
    return render(text, tasks, rng, config.domain)


def convert_corpus(texts: Sequence[str], config: AdaptLLMConfig = AdaptLLMConfig(), seed: int = 0,
                   titles: Sequence[str | None] | None = None,
                   keywords: frozenset[str] = frozenset()) -> list[str]:
    """:func:`reading_comprehension` of every text (titles aligned with texts, or None)."""
    titles = [None] * len(texts) if titles is None else titles
    if len(titles) != len(texts):
        raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
    return [reading_comprehension(text, config, seed, title, keywords) for text, title in zip(texts, titles)]


# -------------------------------------------------------------------------------- keywords, mix

def domain_keywords(domain_texts: Iterable[str], general_texts: Iterable[str], min_chars: int = 8,
                    min_documents: int = 3) -> frozenset[str]:
    """Lower-cased words of ``min_chars``+ letters found in ``min_documents``+ domain texts and in
    no general text: the analogue of AdaptLLM's long pieces of a domain SentencePiece vocabulary
    that the general vocabulary lacks."""
    general = {w.lower() for text in general_texts for w in _WORD.findall(text)}
    document_counts = Counter(w for text in domain_texts
                              for w in {w.lower() for w in _WORD.findall(text) if len(w) >= min_chars})
    return frozenset(w for w, n in document_counts.items() if n >= min_documents and w not in general)


def mix_with_instructions(domain_texts: Sequence[str], instruction_texts: Sequence[str], ratio: float,
                          seed: int) -> list[str]:
    """Domain texts plus ``round(ratio · len(domain_texts))`` general-instruction texts, shuffled.

    AdaptLLM continues pretraining on reading-comprehension texts mixed with general instructions
    (its Fig. 1, Section 4); ``ratio`` is instructions per domain text. Instructions are drawn
    without replacement, epoch after epoch of a seeded permutation when more are needed than exist.
    """
    if ratio < 0:
        raise ValueError(f"the instruction ratio must be >= 0, got {ratio}")
    wanted = round(ratio * len(domain_texts))
    if wanted and not instruction_texts:
        raise ValueError(f"ratio {ratio} asks for {wanted} instruction texts but none were given")
    rng = random.Random(f"adaptllm-mix|{seed}")
    picks: list[int] = []
    while len(picks) < wanted:
        order = list(range(len(instruction_texts)))
        rng.shuffle(order)
        picks += order
    mixed = list(domain_texts) + [instruction_texts[i] for i in picks[:wanted]]
    rng.shuffle(mixed)
    return mixed
