"""Local stand-ins of every hub artifact the paper presets read, where Hugging Face looks offline.

``build_standins(home)`` writes, deterministically and without network, a Hugging Face home
(``HF_HOME``) that the unchanged paper code path resolves the real names in, with
``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``:

- ``<home>/hub/models--<org>--<name>/`` (huggingface_hub's cache: ``refs/main``, ``blobs/``,
  ``snapshots/<commit>/`` links) for the two models: a LLaMA-2-7B stand-in (the real
  ``config.json`` fields, 2 layers at width 64, random weights in two safetensors shards, the real
  tokenizer files around ``data/models/stories260K/tok512.model``, a LLaMA-2-style SentencePiece
  BPE) and t5-base's tokenizer (``data/tokenizers/t5_spiece.model`` is t5's own SentencePiece model);
- ``<home>/datasets/<org>___<name>/<config>/0.0.0/<commit>/`` (datasets' cache, which offline
  ``load_dataset(name, config)`` reads) for every data set. Each is made the way an online load
  makes it: the records are first written in the hub repository's file layout with its card's
  ``configs:`` (``<home>/repos/datasets/<org>/<name>/``), then read by ``datasets``' own packaged
  builder (parquet or json, as the hub's files) into the cache.

Records are a handful per split, with the real column names, types, nesting, configs and splits
(rehearsal/README.md says where each schema was checked); where the offline folder has real
records of the same data (GSM8K, C4, PubMed abstracts, Alpaca) they are reused, reshaped.
:func:`break_standin` breaks one stand-in on purpose (a renamed column) to show a run names it.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from experiments.data.finetune import ALPACA_FILE, GSM8K_FILES, PUBMEDQA_FILE, gsm8k_to_metamath
from experiments.data.offline import verify_files
from experiments.paths import DEFAULT_DATA_ROOT

LLAMA2 = "meta-llama/Llama-2-7b-hf"
T5_BASE = "t5-base"
FINANCE_CORPUS = "rehearsal/financial-news"  # no real counterpart: the paper's corpus is unreleased
ROWS = 8  # records per split (AdaptLLM and MMLU test splits; others say their own)

# --------------------------------------------------------------------------------- models

# meta-llama/Llama-2-7b-hf's config.json, field for field; the stand-in changes only the shape
# (width, depth, heads) and the vocabulary size, which follows its tokenizer (tok512.model).
LLAMA2_CONFIG = {
    "_name_or_path": LLAMA2, "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0.dev0",
    "use_cache": True, "vocab_size": 32000}
LLAMA2_SHRINK = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "vocab_size": 512}
LLAMA2_GENERATION = {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "pad_token_id": 0, "temperature": 0.6,
                     "max_length": 4096, "top_p": 0.9, "transformers_version": "4.31.0.dev0"}


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


LLAMA2_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": _added("<s>"), "clean_up_tokenization_spaces": False,
    "eos_token": _added("</s>"), "legacy": False, "model_max_length": 1000000000000000019884624838656,
    "pad_token": None, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    "unk_token": _added("<unk>")}
LLAMA2_SPECIAL_TOKENS = {key: {k: v for k, v in LLAMA2_TOKENIZER_CONFIG[key].items() if k != "__type"}
                         for key in ("bos_token", "eos_token", "unk_token")}
T5_CONFIG = {  # t5-base's config.json (the task reads only the tokenizer; the model is never built)
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 3072, "d_kv": 64, "d_model": 768,
    "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
    "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
    "num_heads": 12, "num_layers": 12, "output_past": True, "pad_token_id": 0,
    "relative_attention_num_buckets": 32, "vocab_size": 32128}
LLAMA_TOKENIZER_FILE = "models/stories260K/tok512.model"
T5_SPIECE_FILE = "tokenizers/t5_spiece.model"


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=False) + "\n").encode()


def _llama2_weights(config: dict) -> dict:
    """Random weights of the stand-in's shape, the same on every build (seed 0), in float16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures",
                                                                                      "transformers_version")}
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**fields))
    finally:
        torch.random.set_rng_state(state)
    return {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in model.state_dict().items()}


def _safetensors_shards(tensors: dict, n_shards: int = 2) -> dict[str, bytes]:
    """``model-0000i-of-0000n.safetensors`` files and their index, as the hub repository holds them."""
    from safetensors.torch import save

    names = list(tensors)
    per = -(-len(names) // n_shards)
    files, weight_map = {}, {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i * per:(i + 1) * per]}
        files[shard] = save(part, metadata={"format": "pt"})
        weight_map |= {name: shard for name in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files["model.safetensors.index.json"] = _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def _tokenizer_json(tokenizer_class, files: dict[str, bytes]) -> bytes:
    """``tokenizer.json`` as transformers converts the SentencePiece model with the repo's settings
    (how the hub's own tokenizer.json files were made)."""
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        tokenizer = tokenizer_class.from_pretrained(folder)
        return tokenizer.backend_tokenizer.to_str(pretty=True).encode() + b"\n"


def llama2_files(data_root: Path) -> dict[str, bytes]:
    from transformers import LlamaTokenizer

    config = LLAMA2_CONFIG | LLAMA2_SHRINK
    (sp_model,) = verify_files(data_root, [LLAMA_TOKENIZER_FILE])
    tokenizer = {"tokenizer.model": sp_model.read_bytes(), "tokenizer_config.json": _json_bytes(LLAMA2_TOKENIZER_CONFIG),
                 "special_tokens_map.json": _json_bytes(LLAMA2_SPECIAL_TOKENS)}
    tokenizer["tokenizer.json"] = _tokenizer_json(LlamaTokenizer, tokenizer)
    return {"config.json": _json_bytes(config), "generation_config.json": _json_bytes(LLAMA2_GENERATION),
            **_safetensors_shards(_llama2_weights(config)), **tokenizer}


def t5_base_files(data_root: Path) -> dict[str, bytes]:
    from transformers import T5TokenizerFast

    (spiece,) = verify_files(data_root, [T5_SPIECE_FILE])
    files = {"spiece.model": spiece.read_bytes(), "config.json": _json_bytes(T5_CONFIG)}
    files["tokenizer.json"] = _tokenizer_json(T5TokenizerFast, {"spiece.model": files["spiece.model"]})
    return files


def write_hub_model(hub_cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """``files`` as huggingface_hub caches a model repository: blobs by SHA-256, ``snapshots/<commit>/``
    links to them, ``refs/main`` naming the commit (a hash of the files, so builds are reproducible)."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(b"".join(name.encode() + hashlib.sha256(data).digest()
                                   for name, data in sorted(files.items()))).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# ------------------------------------------------------------------------------- data sets

@dataclass(frozen=True)
class HubDataset:
    """A hub data set: per config and split, its records and the file they sit in in the repository.

    ``features``: the card's declared schema (``datasets.Features``), None where the hub's files
    alone define it (the json builder infers it, as online). ``fmt``: the files' format.
    """

    repo_id: str
    records: Callable[[Path], dict[str, dict[str, list[dict]]]]   # data_root -> {config: {split: rows}}
    path: Callable[[str, str], str]                               # (config, split) -> file in the repo
    fmt: str                                                      # parquet | json | jsonl.gz
    features: Callable[[], object] | None = None
    card_configs: bool = True                                     # the card lists configs: / data_files:
    checked: str = ""                                             # where the schema was checked
    used_by: tuple[str, ...] = field(default_factory=tuple)


def _offline_json_lines(data_root: Path, relative: str) -> list[dict]:
    (path,) = verify_files(data_root, [relative])
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _alpaca(data_root: Path) -> list[dict]:
    (path,) = verify_files(data_root, [ALPACA_FILE])
    return json.loads(path.read_text(encoding="utf-8"))


def _pubmed_abstracts(data_root: Path, n: int) -> list[str]:
    (path,) = verify_files(data_root, [PUBMEDQA_FILE])
    items = json.loads(path.read_text(encoding="utf-8"))
    return [" ".join([*row["CONTEXTS"], row["LONG_ANSWER"]]) for _, row in sorted(items.items())[:n]]


def tulu_records(data_root: Path) -> dict:
    """Tülu v2 conversations from Alpaca items: single and multi-turn, one with a system turn."""
    alpaca = _alpaca(data_root)[:3 * ROWS]
    rows = []
    for i in range(ROWS):
        a, b, c = alpaca[3 * i:3 * i + 3]
        messages = [{"role": "user", "content": a["instruction"] + ("\n" + a["input"] if a["input"] else "")},
                    {"role": "assistant", "content": a["output"]}]
        if i % 2:
            messages += [{"role": "user", "content": b["instruction"]}, {"role": "assistant", "content": b["output"]}]
        if i % 4 == 3:
            messages = [{"role": "system", "content": "You are a helpful assistant."}] + messages
        rows.append({"dataset": ("flan_v2", "oasst1", "sharegpt", "cot")[i % 4], "id": f"{i}", "messages": messages})
    return {"default": {"train": rows}}


def metamathqa_records(data_root: Path) -> dict:
    """MetaMathQA rows from GSM8K train problems, their answers in MetaMath's style."""
    rows = _offline_json_lines(data_root, GSM8K_FILES["train"])[:ROWS]
    kinds = ("GSM_Rephrased", "GSM_AnsAug", "GSM_SV", "GSM_FOBAR")
    return {"default": {"train": [{"type": kinds[i % 4], "query": r["question"], "original_question": r["question"],
                                   "response": gsm8k_to_metamath(r["answer"])} for i, r in enumerate(rows)]}}


def c4_records(data_root: Path) -> dict:
    """C4-en documents of the offline sample: the train split, and others as validation."""
    (path,) = verify_files(data_root, ["c4/c4-sample.00000-of-00001.json.gz"])
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in itertools.islice(f, 3 * ROWS)]
    rows = [{"text": d["text"], "timestamp": d.get("timestamp", "2019-04-25T12:57:54Z"), "url": d["url"]} for d in docs]
    return {"en": {"train": rows[:2 * ROWS], "validation": rows[2 * ROWS:]}}


def pubmed_records(data_root: Path) -> dict:
    return {"default": {"train": [{"text": text, "meta": {"pile_set_name": "PubMed Abstracts"}}
                                  for text in _pubmed_abstracts(data_root, ROWS)]}}


def finance_records(data_root: Path) -> dict:
    """A text column of financial news-like sentences (no real corpus: see FINANCE_CORPUS)."""
    rows = []
    for i in range(ROWS):
        rows.append({"text": f"Company {i} reported quarterly revenue of {100 + 7 * i} million dollars. "
                             f"However, operating margins fell by {i + 1} percent because of higher input costs. "
                             f"Therefore, the board lowered its full-year guidance for fiscal {2020 + i % 4}. "
                             "Moreover, analysts expect the dividend to remain unchanged next quarter."})
    return {"default": {"train": rows}}


MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions")


def mmlu_records(data_root: Path) -> dict:
    def rows(subject: str, split: str, n: int) -> list[dict]:
        return [{"question": f"Which option is number {i % 4} in {subject.replace('_', ' ')} ({split} {i})?",
                 "subject": subject, "choices": [f"option {k}" for k in range(4)], "answer": i % 4} for i in range(n)]
    return {s: {"test": rows(s, "test", ROWS), "validation": rows(s, "validation", 2), "dev": rows(s, "dev", 5)}
            for s in MMLU_SUBJECTS}


def gsm8k_records(data_root: Path) -> dict:
    test = _offline_json_lines(data_root, GSM8K_FILES["test"])[:ROWS]
    train = _offline_json_lines(data_root, GSM8K_FILES["train"])[:ROWS]
    return {"main": {"train": train, "test": test}}


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


def math_records(data_root: Path) -> dict:
    def rows(subject: str, split: str) -> list[dict]:
        return [{"problem": f"What is ${i} + {i + 1}$? ({subject}, {split})", "level": f"Level {1 + i % 5}",
                 "type": subject.replace("_", " ").title(),
                 "solution": f"We add: ${i} + {i + 1} = \\boxed{{{2 * i + 1}}}$."} for i in range(ROWS)]
    return {s: {"train": rows(s, "train"), "test": rows(s, "test")} for s in MATH_SUBJECTS}


def _demos(label: str) -> str:
    return "".join(f"Example {k}: some {label} text.\nAnswer: {k}\n\n" for k in range(2))


def _choice_rows(task: str, options: list[str], extra: Callable[[int], dict] = lambda i: {}) -> list[dict]:
    return [{"input": _demos(task) + f"Question {i} about {task}?\nAnswer:", "options": options,
             "gold_index": i % len(options)} | extra(i) for i in range(ROWS)]


def medicine_records(data_root: Path) -> dict:
    return {
        "PubMedQA": {"test": _choice_rows("PubMedQA", ["yes", "no", "maybe"])},
        "USMLE": {"test": _choice_rows("USMLE", ["A drug", "B drug", "C drug", "D drug"])},
        "RCT": {"test": _choice_rows("RCT", ["background", "objective", "methods", "results", "conclusions"])},
        "ChemProt": {"test": _choice_rows("ChemProt", ["upregulator", "downregulator", "agonist"])},
        "MQP": {"test": _choice_rows("MQP", ["yes", "no"])},
    }


def finance_task_records(data_root: Path) -> dict:
    return {
        "ConvFinQA": {"test": [{"id": f"convfinqa-{i}", "input": _demos("ConvFinQA") + f"What is {i} plus 1?\nAnswer:",
                                "label": [f"{i + 1}"]} for i in range(ROWS)]},
        "FiQA_SA": {"test": _choice_rows("FiQA_SA", ["negative", "neutral", "positive"])},
        "FPB": {"test": _choice_rows("FPB", ["negative", "neutral", "positive"])},
        "Headline": {"test": _choice_rows("Headline", ["Yes", "No"], lambda i: {"class_id": i % 9})},
        "NER": {"test": [{"input": _demos("NER") + f"Entities in: Acme {i} signed with Bob {i}.\nAnswer:",
                          "label": [f"Acme{i} (ORG), Bob{i} (PER)"]} for i in range(ROWS)]},
    }


def _features_tulu():
    from datasets import Features, Value
    return Features({"dataset": Value("string"), "id": Value("string"),
                     "messages": [{"role": Value("string"), "content": Value("string")}]})


def _features_strings(*names: str):
    from datasets import Features, Value
    return lambda: Features({name: Value("string") for name in names})


def _features_pubmed():
    from datasets import Features, Value
    return Features({"text": Value("string"), "meta": {"pile_set_name": Value("string")}})


def _features_mmlu():
    from datasets import ClassLabel, Features, Sequence, Value
    return Features({"question": Value("string"), "subject": Value("string"), "choices": Sequence(Value("string")),
                     "answer": ClassLabel(names=["A", "B", "C", "D"])})


ADAPTLLM_PATHS = {"PubMedQA": "pubmed_qa", "USMLE": "usmle", "RCT": "RCT", "ChemProt": "ChemProt", "MQP": "MedQs",
                  "ConvFinQA": "ConviFinQA", "FiQA_SA": "FiQA_SA", "FPB": "FPB", "Headline": "Headline", "NER": "NER"}

DATASETS = (
    HubDataset("allenai/tulu-v2-sft-mixture", tulu_records, lambda c, s: f"data/{s}-00000-of-00001.parquet",
               "parquet", _features_tulu, checked="dataset card (configs, dataset_info features, 326,154 rows)",
               used_by=("tulu_paper",)),
    HubDataset("meta-math/MetaMathQA", metamathqa_records, lambda c, s: "MetaMathQA-395K.json", "json",
               _features_strings("type", "query", "original_question", "response"), card_configs=False,
               checked="repository files (one MetaMathQA-395K.json, no configs in the card: split train); "
                       "columns from the dataset viewer's schema as its parquet copies declare it",
               used_by=("metamath_paper",)),
    HubDataset("allenai/c4", c4_records, lambda c, s: f"{c}/c4-{s}.00000-of-{'01024' if s == 'train' else '00008'}"
               ".json.gz", "jsonl.gz", _features_strings("text", "timestamp", "url"),
               checked="dataset card (config en: train, validation; text, timestamp, url strings)",
               used_by=("c4_paper",)),
    HubDataset("timaeus/pile-pubmed_abstracts", pubmed_records, lambda c, s: f"data/{s}-00000-of-00001.parquet",
               "parquet", _features_pubmed, checked="loaders that read it (split train, column text); meta struct as "
               "the card of its sibling timaeus/pile-pubmed_central", used_by=("biomed_paper",)),
    HubDataset(FINANCE_CORPUS, finance_records, lambda c, s: f"data/{s}-00000-of-00001.parquet", "parquet",
               _features_strings("text"), checked="the schema conf/task/finance.yaml requires of the corpus task.hub_id names "
               "(a train split with a text column); the paper's financial-news corpus is unreleased, so there "
               "is no card to check", used_by=("finance_paper",)),
    HubDataset("cais/mmlu", mmlu_records, lambda c, s: f"{c}/{s}-00000-of-00001.parquet", "parquet", _features_mmlu,
               checked="dataset card (57 subject configs: test, validation, dev; question, subject, choices, "
               "answer ClassLabel A-D); lm-eval's mmlu/default/_default_template_yaml",
               used_by=("mmlu", "mmlu_biomed")),
    HubDataset("openai/gsm8k", gsm8k_records, lambda c, s: f"{c}/{s}-00000-of-00001.parquet", "parquet",
               _features_strings("question", "answer"), checked="lm-eval's gsm8k.yaml (config main, train/test, "
               "question, answer); records are real GSM8K ones", used_by=("gsm8k_metamath",)),
    HubDataset("EleutherAI/hendrycks_math", math_records, lambda c, s: f"{c}/{s}-00000-of-00001.parquet", "parquet",
               _features_strings("problem", "level", "type", "solution"), checked="its loader script's features "
               "(problem, level, type, solution), parquet layout <subject>/<split>-00000-of-00001.parquet; "
               "lm-eval's hendrycks_math yamls", used_by=("math_metamath",)),
    HubDataset("AdaptLLM/medicine-tasks", medicine_records, lambda c, s: f"{ADAPTLLM_PATHS[c]}/{s}.json", "json",
               checked="dataset card (configs ChemProt, MQP, PubMedQA, RCT, USMLE; split test; folder names); "
               "fields input, options, gold_index from AdaptLLM's own reader (microsoft/LMOps adaptllm/src)",
               used_by=("biomed_adaptllm",)),
    HubDataset("AdaptLLM/finance-tasks", finance_task_records, lambda c, s: f"{ADAPTLLM_PATHS[c]}/{s}.json", "json",
               checked="repository folders (ConviFinQA, FPB, FiQA_SA, Headline, NER: test.json); config names and "
               "fields input, options, gold_index, class_id (Headline), label (a list: ConvFinQA, NER) from "
               "AdaptLLM's own reader and scorer (microsoft/LMOps adaptllm/src)", used_by=("finance_adaptllm",)),
)


def _write_rows(path: Path, rows: list[dict], fmt: str, features) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        import datasets
        datasets.Dataset.from_list(rows, features=features() if features else None).to_parquet(str(path))
    elif fmt == "json":  # one JSON array, as MetaMathQA-395K.json and AdaptLLM's test.json
        path.write_text(json.dumps(rows, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same bytes on every build
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def _card(spec: HubDataset, records: dict) -> str:
    """The card's YAML ``configs:`` block, as the hub repository declares its files."""
    if not spec.card_configs:  # MetaMathQA's card: metadata, no configs (its one file is the train split)
        return "---\nlicense: mit\ntags:\n- math\n- math-qa\n---\n"
    lines = ["---", "configs:"]
    for config, splits in records.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {spec.path(config, split)}" for split in splits]
    return "\n".join(lines + ["---", ""])


def write_repo(spec: HubDataset, repos: Path, data_root: Path, rename: tuple[str, str] | None = None) -> Path:
    """The data set's files in its hub repository layout (with its card), under ``repos``."""
    repo = repos / spec.repo_id
    records = spec.records(data_root)
    if rename is not None:
        old, new = rename
        records = {c: {s: [{(new if k == old else k): v for k, v in r.items()} for r in rows] for s, rows in splits.items()}
                   for c, splits in records.items()}
    features = None if (spec.features is None or rename is not None) else spec.features
    for config, splits in records.items():
        for split, rows in splits.items():
            _write_rows(repo / spec.path(config, split), rows, spec.fmt, features)
    (repo / "README.md").write_text(_card(spec, records), encoding="utf-8")
    return repo


def _cache_name(repo_id: str) -> str:
    """The folder ``datasets`` caches a hub data set in: ``<org>___<name in snake case>``."""
    from datasets.naming import camelcase_to_snakecase
    *org, name = repo_id.split("/")
    return "___".join([*org, camelcase_to_snakecase(name)])


def cache_dataset(spec: HubDataset, repo: Path, datasets_cache: Path, commit: str, rename: bool = False) -> None:
    """Read the repository's files with ``datasets``' packaged builder, config by config, into the cache
    folder an online ``load_dataset(spec.repo_id, config)`` fills (``<org>___<name>/<config>/0.0.0/<commit>``)."""
    from datasets.load import dataset_module_factory, get_dataset_builder_class
    from datasets.naming import camelcase_to_snakecase

    module = dataset_module_factory(str(repo))
    builder_cls = get_dataset_builder_class(module, dataset_name=camelcase_to_snakecase(repo.name))
    configs = module.builder_configs_parameters.builder_configs
    names = [c.name for c in configs] if configs else ["default"]
    name = camelcase_to_snakecase(spec.repo_id.split("/")[-1])
    target = datasets_cache / _cache_name(spec.repo_id)
    with tempfile.TemporaryDirectory(dir=datasets_cache) as staging:
        for config in names:
            kwargs = {k: v for k, v in module.builder_kwargs.items() if k not in ("dataset_name", "repo_id")}
            features = None if (spec.features is None or rename) else spec.features()
            builder = builder_cls(cache_dir=staging, dataset_name=name, config_name=config, hash=commit,
                                  features=features, **kwargs)
            builder.download_and_prepare()
            # declared features make datasets suffix the config folder (custom features): the hub's
            # card declares them, so an online load keeps the plain config name
            built = Path(builder.cache_dir)
            final = target / config / built.parent.name / built.name
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(built), str(final))


# --------------------------------------------------------------------------------- the home

@dataclass(frozen=True)
class StandIns:
    home: Path
    models: dict[str, Path]
    datasets: dict[str, Path]


def build_standins(home: str | Path, data_root: str | Path = DEFAULT_DATA_ROOT) -> StandIns:
    """Write every stand-in into the (new or empty) folder ``home``, to be used as ``HF_HOME``."""
    import datasets

    datasets.disable_progress_bars()
    home, data_root = Path(home), Path(data_root)
    if home.exists() and any(home.iterdir()):
        raise FileExistsError(f"{home} is not empty; stand-ins are built into a new folder")
    (home / "datasets").mkdir(parents=True)
    models = {LLAMA2: write_hub_model(home / "hub", LLAMA2, llama2_files(data_root)),
              T5_BASE: write_hub_model(home / "hub", T5_BASE, t5_base_files(data_root))}
    return StandIns(home, models, {spec.repo_id: build_dataset(home, spec, data_root) for spec in DATASETS})


def build_dataset(home: Path, spec: HubDataset, data_root: str | Path = DEFAULT_DATA_ROOT,
                  rename: tuple[str, str] | None = None) -> Path:
    """One data set's repository files and cache under ``home``; ``rename=(old, new)`` renames a column."""
    repo = write_repo(spec, home / "repos" / "datasets", Path(data_root), rename)
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file())).hexdigest()
    cache_dataset(spec, repo, home / "datasets", commit, rename=rename is not None)
    return repo


def break_standin(home: str | Path, broken: str | Path, repo_id: str, old: str, new: str,
                  data_root: str | Path = DEFAULT_DATA_ROOT) -> Path:
    """A copy of the stand-ins ``home`` at ``broken`` in which data set ``repo_id`` has column ``old``
    renamed ``new`` in every record: the deliberately broken stand-in a run must name."""
    specs = {spec.repo_id: spec for spec in DATASETS}
    if repo_id not in specs:
        raise ValueError(f"{repo_id!r} is not a stand-in data set (stand-ins: {sorted(specs)})")
    shutil.copytree(home, broken, symlinks=True)
    broken = Path(broken)
    shutil.rmtree(broken / "repos" / "datasets" / repo_id)
    for cached in (broken / "datasets").glob(f"{_cache_name(repo_id)}*"):
        shutil.rmtree(cached)
    build_dataset(broken, specs[repo_id], data_root, (old, new))
    return broken


def offline_environment(home: str | Path) -> dict[str, str]:
    """The variables under which the paper path reads the stand-ins and never the network."""
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_TRUST_REMOTE_CODE": "0"}
