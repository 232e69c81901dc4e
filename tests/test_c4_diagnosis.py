"""analysis/c4_diagnosis.py on synthetic C4 run folders: settings told apart, epochs, the overfitting gap."""

from analysis.c4_diagnosis import diagnosis_markdown, load_diagnosis
from experiments.loop.records import RunRecord


def write_run(root, method, lr, steps, trainable, ppl, train_loss, eval_loss, status="completed"):
    config = {"rank": 128, "seed": 0, "lr": lr, "scale": {"name": "mini"}, "model": {"name": "llama_mini"},
              "task": {"name": "c4", "seq_len": 128}, "train": {"batch_size": 16, "grad_accum": 1, "max_steps": steps},
              "method": {"name": method, "target_modules": [] if method == "fft" else ["q_proj"],
                         "trainable_modules": trainable},
              "resolved": {"lr": lr, "effective_rank": 21}}
    record = RunRecord.create(root / f"{method}-{steps}-{len(trainable)}-{lr}", config, resume=False)
    for step, value in ppl.items():
        record.log(step, loss=train_loss, **{"eval/perplexity": value, "eval/loss": eval_loss})
    record.write_summary({"status": status, "final": {"loss": train_loss, "eval/loss": eval_loss}})


def test_table_rows_epochs_and_gap(tmp_path):
    write_run(tmp_path, "fft", 3e-3, 400, [], {200: 300.0, 400: 150.0}, 4.9, 5.0)
    write_run(tmp_path, "lora", 3e-3, 400, ["embed_tokens", "lm_head"], {200: 400.0, 400: 120.0}, 4.7, 4.8)
    write_run(tmp_path, "lora", 3e-3, 400, [], {400: 900.0}, 6.5, 6.8)
    write_run(tmp_path, "fft", 1e-2, 400, [], {400: 999.0}, 9.0, 9.0, status="diverged")   # left out
    runs = load_diagnosis(tmp_path)
    assert [d.setting for d in runs] == ["FFT (every weight)", "LoRA r=128 + embed_tokens, lm_head",
                                         "LoRA r=128 + nothing else (embeddings, norms, head frozen)"]
    text = diagnosis_markdown(runs, train_tokens=400 * 16 * 128 // 2)
    assert "| FFT (every weight) | 0.003 | 400 | 2.0 | 150.0 | 4.900 | +0.100 | 300.0 | 150.0 |" in text


def test_docs_show_the_report_of_the_committed_diagnosis_runs():
    from pathlib import Path

    from analysis.c4_diagnosis import preset_train_tokens

    repo = Path(__file__).resolve().parents[1]
    rendered = diagnosis_markdown(load_diagnosis(repo / "tests" / "fixtures" / "c4_diagnosis"), preset_train_tokens())
    table = rendered.split("\n\n", 2)[2]   # past the title and the one-line description
    assert table.strip() in (repo / "docs" / "calibration.md").read_text()
