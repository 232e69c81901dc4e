"""SFT and continual-pretraining tasks: exact label masking, padding, truncation, deterministic and
epoch-covering batches, process slices that partition a batch, and held-out scores equal to a
plain per-example computation on a tiny random LLaMA with the stories260K tokenizer."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from experiments.tasks.base import IGNORE_INDEX, evaluate_perplexity
from experiments.data.finetune import (ChoiceExample, Segment, alpaca_eval_indices, gsm8k_pairs, load_alpaca,
                                       load_gsm8k, load_pubmedqa, pubmedqa_abstract, split_heldout, split_pubmedqa)
from experiments.models.loading import STORIES260K
from experiments.data.offline import DEFAULT_DATA_ROOT, verify_files
from experiments.data.finetune import pubmed_texts
from experiments.tasks.examples import collate, encode_choices, encode_examples, encode_texts
from experiments.tasks.finetune import FinetuneTaskSpec, SFTTask, TextTask, build_finetune_task
from experiments.models.sp_tokenizer import load_sentencepiece_tokenizer
from lm_eval_tasks import utils
from tests.test_finetune_data import heldout_sections

PAIRS = [("Question: what colour is the sky?\nAnswer:", "It is blue."),
         ("Question: how many legs has a cat?\nAnswer:", "Four."),
         ("Q: name a fruit.\nA:", "An apple, a pear or a plum."),
         ("Say hi.", "Hi!"),
         ("Tell a story about a dog and a ball in the park.", "Once upon a time, a dog found a red ball."),
         ("2+2=", "4"),
         ("Spell cat.", "c a t"),
         ("What is 10 minus 3?", "Ten minus three is seven.")]


@pytest.fixture(scope="module")
def tok():
    (path,) = verify_files(DEFAULT_DATA_ROOT, [STORIES260K[1]])
    return load_sentencepiece_tokenizer(path)


@pytest.fixture(scope="module")
def tiny_model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


# -------------------------------------------------------------------------------- label masking

def test_only_response_tokens_and_eos_carry_labels(tok):
    task = SFTTask(PAIRS, tok, batch_size=len(PAIRS), seed=0, max_len=256)
    batch = collate(task.data, range(len(PAIRS)), task.pad_id)
    for row, (prompt, response) in enumerate(PAIRS):
        expected = [tok.bos_token_id] + ids(tok, prompt) + ids(tok, response) + [tok.eos_token_id]
        n = len(expected)
        assert batch["input_ids"][row, :n].tolist() == expected
        labels = batch["labels"][row]
        n_prompt = 1 + len(ids(tok, prompt))
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert labels[n_prompt:n].tolist() == ids(tok, response) + [tok.eos_token_id]
        assert tok.decode(labels[n_prompt:n - 1]) == response
        assert (labels[n:] == IGNORE_INDEX).all()


def test_every_assistant_turn_of_a_conversation_is_trained(tok):
    conversation = (Segment("<|user|>\nHi\n<|assistant|>\n", False), Segment("Hello.", True),
                    Segment("\n<|user|>\nBye\n<|assistant|>\n", False), Segment("Goodbye.", True))
    data = encode_examples([conversation], tok, max_len=256)
    labels = collate(data, [0], tok.pad_token_id)["labels"][0]
    trained = labels[labels != IGNORE_INDEX].tolist()
    assert trained == ids(tok, "Hello.") + [tok.eos_token_id] + ids(tok, "Goodbye.") + [tok.eos_token_id]


def test_padding_is_masked_everywhere(tok):
    task = SFTTask(PAIRS, tok, batch_size=len(PAIRS), seed=0, max_len=256)
    batch = task.batch(0)
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.max() == batch["input_ids"].shape[1] and lengths.min() < lengths.max()
    for row, n in enumerate(lengths.tolist()):
        assert (batch["attention_mask"][row, :n] == 1).all() and (batch["attention_mask"][row, n:] == 0).all()
        assert (batch["input_ids"][row, n:] == task.pad_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_truncation_keeps_the_prompt_start_and_drops_examples_left_without_labels(tok):
    prompt, response = PAIRS[0]
    full = [tok.bos_token_id] + ids(tok, prompt) + ids(tok, response) + [tok.eos_token_id]
    max_len = 1 + len(ids(tok, prompt)) + 2           # the prompt and two response tokens
    long_prompt = ("Read this long question carefully " * 20, "Yes.")
    data = encode_examples([PAIRS[0], long_prompt], tok, max_len=max_len)
    assert len(data) == 1 and data.n_dropped == 1 and data.full_lengths.tolist()[0] == len(full) > max_len
    row, trained = data.row(0)
    assert row.tolist() == full[:max_len] and trained.sum() == 2   # the response's end and EOS are cut
    with pytest.raises(ValueError, match="no example"):
        encode_examples([long_prompt], tok, max_len=max_len)


# ------------------------------------------------------------------------------------ batching

def unpadded_rows(batch):
    return [tuple(ids[:n].tolist()) + tuple(lab[:n].tolist())
            for ids, lab, n in zip(batch["input_ids"], batch["labels"], batch["attention_mask"].sum(dim=1))]


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch(tok):
    first, second = (SFTTask(PAIRS, tok, batch_size=3, seed=7, max_len=256) for _ in range(2))
    for step in (5, 0, 3, 1):  # any order: a resumed run asks for a later step first
        a, b = first.batch(step), second.batch(step)
        assert all(torch.equal(a[k], b[k]) for k in a)
    steps_per_epoch = len(PAIRS) // 3
    epoch = [row for step in range(steps_per_epoch) for row in unpadded_rows(first.batch(step))]
    assert len(set(epoch)) == len(epoch) == steps_per_epoch * 3  # no example twice within an epoch
    other_seed = SFTTask(PAIRS, tok, batch_size=3, seed=8, max_len=256)
    assert any(unpadded_rows(first.batch(s)) != unpadded_rows(other_seed.batch(s)) for s in range(3))


@pytest.mark.parametrize("num_processes", [2, 3])
def test_process_slices_partition_the_global_batch(tok, num_processes):
    task = SFTTask(PAIRS, tok, batch_size=6, seed=1, max_len=256)
    whole = unpadded_rows(task.batch(4))
    slices = [unpadded_rows(task.batch(4, i, num_processes)) for i in range(num_processes)]
    assert sorted(r for s in slices for r in s) == sorted(whole)
    assert all(s == whole[i::num_processes] for i, s in enumerate(slices))


def test_batch_trains_a_model_with_the_loop_call(tok, tiny_model):
    batch = SFTTask(PAIRS, tok, batch_size=4, seed=0, max_len=256).batch(0)
    loss = tiny_model(**batch).loss
    assert torch.isfinite(loss) and abs(loss.item() - math.log(len(tok))) < 1.0  # near-uniform at init


# ---------------------------------------------------------------------------------- evaluation

def manual_response_nll(model, tok, pairs):
    """Per example, unpadded: −log p(response tokens, EOS | BOS, prompt), summed, and the token count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in pairs:
            context = [tok.bos_token_id] + ids(tok, prompt)
            target = ids(tok, response) + [tok.eos_token_id]
            logits = model(input_ids=torch.tensor([context + target])).logits[0]
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            for j, token in enumerate(target):
                total -= log_probs[len(context) + j - 1, token].item()
            count += len(target)
    return total, count


def test_response_nll_equals_a_per_example_computation(tok, tiny_model):
    task = SFTTask(PAIRS[:5], tok, batch_size=2, seed=0, max_len=256, eval_examples=PAIRS[3:], eval_batch_size=2)
    tiny_model.train()
    metrics = task.evaluate(tiny_model, torch.device("cpu"))
    assert tiny_model.training  # evaluation runs in eval mode and restores the mode it found
    total, count = manual_response_nll(tiny_model.eval(), tok, PAIRS[3:])
    assert metrics["response_tokens"] == count
    assert metrics["response_nll"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["response_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert SFTTask(PAIRS, tok, 2, 0, 256).evaluate(tiny_model, "cpu") == {}


# ------------------------------------------------------------------------------------ TextTask

DOCS = ["Once upon a time there was a little girl named Lily.", "She liked to play in the park with her dog.",
        "One day the sun was hot and they went home.", "The end of a very short story about a girl and a dog."] * 3


def test_text_task_packs_bos_documents_eos(tok):
    task = TextTask(DOCS, tok, batch_size=2, seed=0, seq_len=16)
    stream = [t for doc in DOCS for t in [tok.bos_token_id, *ids(tok, doc), tok.eos_token_id]]
    assert task.blocks.flatten().tolist() == stream[:task.blocks.numel()]
    assert len(stream) - task.blocks.numel() < 16  # only the final partial block is dropped
    assert encode_texts(DOCS[:1], tok)[0][0] == tok.bos_token_id


def test_text_task_batches_are_deterministic_and_partitioned(tok):
    a, b = TextTask(DOCS, tok, 4, seed=3, seq_len=8), TextTask(DOCS, tok, 4, seed=3, seq_len=8)
    for step in (2, 0, 9):
        assert torch.equal(a.batch(step)["input_ids"], b.batch(step)["input_ids"])
        batch = a.batch(step)
        assert batch["labels"] is batch["input_ids"]
        halves = [a.batch(step, i, 2)["input_ids"] for i in range(2)]
        assert torch.equal(halves[0], batch["input_ids"][0::2]) and torch.equal(halves[1], batch["input_ids"][1::2])
    per_epoch = len(a.blocks) // 4
    epoch = Counter(tuple(r.tolist()) for s in range(per_epoch) for r in a.batch(s)["input_ids"])
    available = Counter(tuple(r.tolist()) for r in a.blocks)
    assert sum(epoch.values()) == per_epoch * 4 and all(epoch[r] <= available[r] for r in epoch)


def test_text_task_evaluates_perplexity_and_choices_like_a_plain_computation(tok, tiny_model):
    choices = [ChoiceExample("The sky is", ("blue", "a dog", "green grass"), 0),
               ChoiceExample("Lily has a", ("dog", "car"), 1)]
    task = TextTask(DOCS, tok, 2, 0, 16, eval_texts=DOCS[:4], eval_choices=choices, eval_batch_size=2, eval_blocks=3)
    metrics = task.evaluate(tiny_model, torch.device("cpu"))
    assert len(task.eval_blocks) == 3
    expected = evaluate_perplexity(tiny_model, task.eval_blocks, 1, torch.device("cpu"))
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    hits = 0
    with torch.no_grad():
        for c in choices:
            context = [tok.bos_token_id] + ids(tok, c.prompt)
            means = []
            for option in c.options:
                target = ids(tok, option)
                log_probs = torch.log_softmax(tiny_model(input_ids=torch.tensor([context + target])).logits[0], -1)
                nll = -sum(log_probs[len(context) + j - 1, t].item() for j, t in enumerate(target))
                means.append(nll / len(target))
            hits += min(range(len(means)), key=means.__getitem__) == c.answer_index
    assert metrics["choice_accuracy"] == pytest.approx(100.0 * hits / len(choices))


def test_choice_rows_longer_than_max_len_lose_the_start_of_their_prompt(tok):
    choice = ChoiceExample("A long context sentence about a park. " * 10 + "Question: is it sunny?", ("yes", "no"), 0)
    rows = encode_choices([choice], tok, max_len=20)
    for i, option in enumerate(choice.options):
        ids_row, trained = rows.row(i)
        full = [tok.bos_token_id] + ids(tok, choice.prompt) + ids(tok, option)
        assert ids_row.tolist() == full[:1] + full[-19:] and trained.sum() == len(ids(tok, option))
        assert trained[-len(ids(tok, option)):].all()
    assert encode_choices([choice], tok).lengths.tolist() == [1 + len(ids(tok, choice.prompt)) + len(ids(tok, o))
                                                               for o in choice.options]


# ----------------------------------------------------------------------------- mini data builders

def mini_task(tok, dataset: str, batch_size: int, max_len: int, n_eval: int):
    spec = FinetuneTaskSpec(name="mini", dataset=dataset, max_len=max_len, n_eval=n_eval)
    return build_finetune_task(spec, tok, batch_size=batch_size, seed=0, data_root=DEFAULT_DATA_ROOT)


def test_gsm8k_task_scores_the_first_test_problems(tok):
    task = mini_task(tok, "gsm8k", batch_size=8, max_len=640, n_eval=20)
    assert len(task.data) + task.data.n_dropped == 7473 and len(task.eval_data) == 20
    test, train = load_gsm8k("test"), load_gsm8k("train")
    assert torch.equal(task.eval_data.tokens, encode_examples(gsm8k_pairs(test[:20]), tok, 640).tokens)
    assert not {row["question"] for row in test} & {row["question"] for row in train}
    assert "median" in task.describe()
    with pytest.raises(ValueError, match="n_eval=1320 exceeds the 1319"):
        mini_task(tok, "gsm8k", batch_size=8, max_len=640, n_eval=1320)


def squash(text: str) -> str:
    return " ".join(text.split())  # decoding collapses runs of spaces


def trained_responses(data, tok) -> list[str]:
    """The trained text of every row of ``data`` (its labelled tokens less the closing EOS), spaces squashed."""
    rows = [data.row(i) for i in range(len(data))]
    return [squash(tok.decode(ids[trained][:-1].tolist())) for ids, trained in rows]


def test_alpaca_task_never_trains_on_a_response_alpaca_local_nll_scores(tok):
    task = mini_task(tok, "alpaca", batch_size=4, max_len=4096, n_eval=10)  # no response cut short
    assert len(task.data) == 80 and len(task.eval_data) == 10
    pairs = load_alpaca()
    scored = utils.load_alpaca_heldout(tokenizer=tok)["test"]  # what lm-eval scores
    assert scored["index"] == alpaca_eval_indices(len(pairs)) and len(scored) == 20
    trained = set(trained_responses(task.data, tok))
    assert trained == {squash(pairs[i][1]) for i in split_heldout(len(pairs))[0]}  # decoding gives the text back
    assert not trained & {squash(target) for target in scored["target"]}
    assert trained_responses(task.eval_data, tok) == [squash(target) for target in scored["target"][:10]]
    with pytest.raises(ValueError, match="n_eval=21 exceeds the 20 held-out"):
        mini_task(tok, "alpaca", batch_size=4, max_len=512, n_eval=21)


def test_pubmed_texts_never_train_on_an_abstract_lm_eval_scores():
    texts, heldout_abstracts, choices = pubmed_texts(instruction_ratio=0.1)
    assert len(texts) == 800 + 80 and len(heldout_abstracts) == len(choices) == 200
    assert heldout_abstracts == utils.load_pubmed_abstracts()["test"]["text"]       # pubmed_abstracts_ppl
    assert [c.prompt for c in choices] == utils.load_pubmedqa_eval()["test"]["prompt"]  # pubmedqa_local
    assert {c.options[c.answer_index] for c in choices} == {"yes", "no", "maybe"}
    corpus = "\n".join(texts)
    train, heldout = split_pubmedqa(load_pubmedqa())
    assert all(pubmedqa_abstract(item) in corpus for item in train)
    assert not [section for section in heldout_sections(heldout) if section in corpus]
    alpaca = load_alpaca()
    assert not [i for i in alpaca_eval_indices(len(alpaca)) if alpaca[i][1].strip() in corpus]
