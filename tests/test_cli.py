"""The peft-mape command: end to end in a subprocess on a tiny BERT with an offline tokenizer."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers as T

from peft_mape.cli.app import build_parser, main

WORDS = "the cat dog sat ran on mat log good bad happy sad fun dull day night".split()
SECRET_WORD = "zebra"  # only in forget texts: it must never reach the audit report


@pytest.fixture(autouse=True)
def _one_thread(one_thread, tmp_path_factory, monkeypatch):
    # in-process runs: keep the datasets cache out of the home directory
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))
    yield


def _write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny random BERT classifier + word-level BERT tokenizer saved offline, and CSV files."""
    root = tmp_path_factory.mktemp("cli")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", SECRET_WORD] + WORDS
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = T.BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=24, max_position_embeddings=64, num_labels=2)
    T.BertForSequenceClassification(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    seen, rows = set(), []
    while len(rows) < 30:  # distinct texts: no forget example doubles as a retain example
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": rng.randint(0, 1)})
    forget = [{"text": f"{SECRET_WORD} {r['text']}", "label": r["label"]} for r in rows[:6]]
    _write_csv(root / "forget.csv", forget)
    _write_csv(root / "retain.csv", rows[6:18])
    _write_csv(root / "test.csv", rows[18:])
    (root / "notes.txt").write_text("not a table")
    return root


def _run(*args, cwd):
    """The command in a fresh interpreter, as a user runs it (one thread, private datasets cache)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(Path(cwd) / "hf-datasets"), "HF_HUB_OFFLINE": "1"}
    script = Path(sys.executable).parent / "peft-mape"  # the console script, when installed
    command = [str(script)] if script.exists() else [sys.executable, "-m", "peft_mape"]
    return subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_unlearn_end_to_end_in_a_subprocess(workdir):
    result = subprocess.run(
        [sys.executable, "-m", "peft_mape", "unlearn", "--model", "model", "--forget", "forget.csv",
         "--retain", "retain.csv", "--test", "test.csv", "--out", "adapter", "--sparsity", "0.5",
         "--method", "ga", "--lr", "1e-2", "--max-steps", "5", "--request-id", "req-1", "--quiet", "--threads", "1"],
        cwd=workdir, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(workdir / "hf-datasets")},
    )
    assert result.returncode == 0, result.stderr
    adapter = workdir / "adapter"
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "audit_report.json"} <= files
    assert "audit report:" in result.stdout and "forget_acc" in result.stdout
    audit_text = (adapter / "audit_report.json").read_text()
    assert SECRET_WORD not in audit_text
    audit = json.loads(audit_text)
    assert audit["guarantee"] == "approximate" and audit["request_id"] == "req-1" and audit["method"] == "ga"
    assert audit["forget_set"]["num_examples"] == 6
    assert audit["selection"]["num_selected_heads"] == 4 and audit["selection"]["heads_per_layer"] == 4
    assert audit["metrics"]["before"]["forget_acc"] is not None and "mia_loss" in audit["metrics"]["after"]
    assert audit["outcome"]["forget_loss_after"] > audit["outcome"]["forget_loss_before"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "MAPE" and config["selection"]


def test_bad_input_is_one_line_with_a_nonzero_exit(workdir):
    missing = _run("unlearn", "--model", "model", "--forget", "nowhere.csv", "--out", "x", cwd=workdir)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == ["peft-mape: error: --forget file not found: nowhere.csv"]
    assert not (workdir / "x").exists()


def test_usage_errors_are_one_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", "model"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("peft-mape: error: the following arguments are required: --forget, --test")
    assert line.endswith("(see 'peft-mape evaluate --help')")


def test_evaluate_and_inspect_the_saved_adapter(workdir, capsys):
    if not (workdir / "adapter").exists():
        pytest.skip("needs the adapter of the end-to-end test")
    out = workdir / "metrics.json"
    assert main(["evaluate", "--model", str(workdir / "model"), "--adapter", str(workdir / "adapter"),
                 "--forget", str(workdir / "forget.csv"), "--test", str(workdir / "test.csv"),
                 "--out", str(out), "--quiet"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["task"] == "classification" and metrics["num_examples"] == {"forget": 6, "test": 12}
    audit = json.loads((workdir / "adapter" / "audit_report.json").read_text())
    # the adapter loaded back from disk measures what unlearn measured right after the update
    measured = {k: v for k, v in audit["metrics"]["after"].items() if not k.startswith("retain_")}
    assert set(measured) == set(metrics["metrics"])
    for key, value in measured.items():
        assert metrics["metrics"][key] == pytest.approx(value, abs=1e-6)
    assert "mia_entropy" in capsys.readouterr().out

    plot = workdir / "selection.png"
    assert main(["inspect", str(workdir / "adapter"), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "total      4/8" in printed and "guarantee approximate" in printed
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_evaluate_the_base_model_writes_metrics_in_the_working_directory(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(["evaluate", "--model", "model", "--forget", "forget.csv", "--test", "test.csv", "--quiet"]) == 0
    assert json.loads((workdir / "eval_metrics.json").read_text())["adapter"] is None


@pytest.mark.parametrize("args, message", [
    (["unlearn", "--model", "model", "--forget", "forget.csv", "--out", "o", "--text-column", "body"],
     "forget.csv: no column 'body'; the file has ['text', 'label']"),
    (["unlearn", "--model", "model", "--forget", "notes.txt", "--out", "o"], "unsupported file type '.txt'"),
    (["unlearn", "--model", "forget.csv", "--forget", "forget.csv", "--out", "o"], "model directory not found"),
    (["unlearn", "--model", ".", "--forget", "forget.csv", "--out", "o"], "has no config.json"),
    (["unlearn", "--model", "model", "--forget", "forget.csv", "--out", "o", "--sparsity", "1.5"],
     "sparsity must be strictly between 0 and 1"),
    (["unlearn", "--model", "model", "--forget", "forget.csv", "--out", "model"], "exists and is not empty"),
    (["unlearn", "--model", "model", "--forget", "forget.csv", "--out", "o", "--task", "causal-lm",
      "--question-column", "text"], "give both --question-column and --answer-column"),
    (["evaluate", "--model", "model", "--adapter", "model", "--forget", "forget.csv", "--test", "test.csv"],
     "no adapter_config.json in"),
    (["inspect", "model"], "no adapter_config.json in model"),
])
def test_input_errors_are_named(workdir, monkeypatch, capsys, args, message):
    monkeypatch.chdir(workdir)
    assert main(args + ["--quiet"] if args[0] != "inspect" else args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peft-mape: error: ") and message in err[0]
    assert not (workdir / "o").exists()


def test_inspect_refuses_other_adapter_types(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert main(["inspect", str(tmp_path)]) == 1
    assert "holds a LORA adapter" in capsys.readouterr().err


def test_help_documents_every_option():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"unlearn", "evaluate", "inspect", "edit"}
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            for option in action.option_strings:
                assert option in text
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


@pytest.fixture(scope="module")
def lora_dir(workdir):
    """A LoRA adapter of the tiny BERT (classifier in modules_to_save), trained a few steps on the
    CSV rows, and the files of a response correction of two of them."""
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(T.BertForSequenceClassification.from_pretrained(workdir / "model"),
                           LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(workdir / "lora")
    rows = list(csv.DictReader(open(workdir / "retain.csv")))
    _write_csv(workdir / "old.csv", rows[:2])
    _write_csv(workdir / "new.csv", [dict(r, label=1 - int(r["label"])) for r in rows[:2]])
    return workdir / "lora"


def test_edit_corrects_a_lora_adapter_into_a_new_directory(workdir, lora_dir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    before = {f.name: f.read_bytes() for f in lora_dir.iterdir()}
    (workdir / "edited").mkdir()
    (workdir / "edited" / "mine.txt").write_text("keep me")
    assert main(["edit", "--model", "model", "--adapter", "lora", "--train", "retain.csv", "--correct", "old.csv",
                 "new.csv", "--out", "edited", "--overwrite", "--request-id", "fix-7",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "edit (response correction, 2 examples, n=12)" in printed and "audit report:" in printed
    assert {f.name: f.read_bytes() for f in lora_dir.iterdir()} == before  # the input adapter is unchanged
    assert (workdir / "edited" / "mine.txt").read_text() == "keep me"  # saving deletes nothing it did not write
    audit_text = (workdir / "edited" / "audit_report.json").read_text()
    audit = json.loads(audit_text)
    assert audit["guarantee"] == "approximate" and audit["request_id"] == "fix-7"
    assert audit["method"] == "llmeraser-influence-edit" and audit["requests"][0]["kind"] == "response_correction"
    assert audit["outcome"]["losses_after"]["new"] <= audit["outcome"]["losses_before"]["new"]
    assert SECRET_WORD not in audit_text and "the cat" not in audit_text
    from peft import PeftModel

    edited = PeftModel.from_pretrained(T.BertForSequenceClassification.from_pretrained(workdir / "model"),
                                       workdir / "edited")
    original = PeftModel.from_pretrained(T.BertForSequenceClassification.from_pretrained(workdir / "model"), lora_dir)
    changed = [n for (n, a), (_, b) in zip(edited.named_parameters(), original.named_parameters())
               if not torch.equal(a, b)]
    assert changed and all("lora_" in n or "modules_to_save" in n for n in changed)


@pytest.mark.parametrize("args, message", [
    (["--remove", "old.csv", "--out", "lora"], "--out must differ from --adapter"),
    (["--remove", "nowhere.csv", "--out", "o"], "--remove file not found: nowhere.csv"),
    (["--correct", "old.csv", "test.csv", "--out", "o"], "old has 2 examples and new has 12"),
    (["--modify", "old.csv", "new.csv", "--out", "o"], "query_modification pair 0: old and new differ in their labels"),
    (["--remove", "old.csv", "--out", "o", "--damping", "lots"], "--damping must be a number or 'auto', got 'lots'"),
])
def test_edit_input_errors_are_named(workdir, lora_dir, monkeypatch, capsys, args, message):
    monkeypatch.chdir(workdir)
    assert main(["edit", "--model", "model", "--adapter", "lora", "--train", "retain.csv", *args, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (workdir / "o").exists()


def test_edit_refuses_an_adapter_that_is_not_lora(tmp_path, workdir, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "MAPE"}))
    assert main(["edit", "--model", str(workdir / "model"), "--adapter", str(tmp_path), "--train",
                 str(workdir / "retain.csv"), "--remove", str(workdir / "forget.csv"), "--out", str(tmp_path / "o")]) == 1
    assert "is a MAPE adapter; edit needs a LoRA adapter" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lm_workdir(tmp_path_factory):
    """A tiny random GPT-2 with a word-level tokenizer, and question/answer JSON Lines files."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("cli-lm")
    words = ["<pad>", "<unk>", "<eos>", "Question:", "Answer:", SECRET_WORD] + WORDS
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                          eos_token="<eos>")
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=len(words), n_embd=16, n_layer=2, n_head=4, n_inner=24, n_positions=64,
                          bos_token_id=2, eos_token_id=2, pad_token_id=0)
    T.GPT2LMHeadModel(config).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    rng = random.Random(1)
    for name, count in (("forget", 4), ("test", 5)):
        rows = [{"question": " ".join(rng.choice(WORDS) for _ in range(3)),
                 "answer": " ".join([SECRET_WORD] * (name == "forget") + [rng.choice(WORDS) for _ in range(3)])}
                for _ in range(count)]
        for row in rows:
            row["text"] = f"{row['question']} {row['answer']}"
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_causal_lm_plain_text_unlearn_and_evaluate(lm_workdir, monkeypatch, capsys):
    monkeypatch.chdir(lm_workdir)
    assert main(["unlearn", "--model", "lm", "--forget", "forget.jsonl", "--test", "test.jsonl", "--out", "plain",
                 "--method", "ga", "--lr", "1e-2", "--max-steps", "3", "--sparsity", "0.5", "--quiet"]) == 0
    audit = json.loads((lm_workdir / "plain" / "audit_report.json").read_text())
    assert {"mia_loss", "mia_zlib", "mia_min_k", "forget_perplexity"} <= set(audit["metrics"]["after"])
    assert SECRET_WORD not in (lm_workdir / "plain" / "audit_report.json").read_text()
    assert main(["evaluate", "--model", "lm", "--adapter", "plain", "--forget", "forget.jsonl", "--test",
                 "test.jsonl", "--min-k", "0.5", "--quiet"]) == 0
    result = json.loads((lm_workdir / "plain" / "eval_metrics.json").read_text())
    assert result["task"] == "causal-lm" and result["min_k"] == 0.5


def test_causal_lm_question_answer_columns(lm_workdir, monkeypatch):
    pytest.importorskip("peft_mape.common.causal_lm")
    monkeypatch.chdir(lm_workdir)
    assert main(["unlearn", "--model", "lm", "--forget", "forget.jsonl", "--out", "qa", "--method", "ga",
                 "--max-steps", "2", "--sparsity", "0.5", "--question-column", "question", "--answer-column",
                 "answer", "--quiet"]) == 0
    assert (lm_workdir / "qa" / "adapter_model.safetensors").is_file()


def test_text_tables_and_label_handling(workdir, tmp_path, monkeypatch):
    from peft_mape.cli import textdata

    tokenizer = T.AutoTokenizer.from_pretrained(workdir / "model")
    (tmp_path / "rows.json").write_text(json.dumps([{"text": "the cat", "label": "POS"},
                                                    {"text": "the dog sat", "label": "NEG"}]))
    table = textdata.load_table(tmp_path / "rows.json")
    dataset, texts = textdata.encode_classification(table, tokenizer, label2id={"NEG": 0, "POS": 1}, num_labels=2)
    assert dataset["labels"] == [1, 0] and texts == ["the cat", "the dog sat"]
    assert dataset["input_ids"][0] == tokenizer("the cat")["input_ids"]
    with pytest.raises(ValueError, match="label 'MAYBE' is not one of the model's labels"):
        textdata.encode_classification(table.map(lambda r: {"label": "MAYBE"}), tokenizer, label2id={"NEG": 0})
    with pytest.raises(ValueError, match="label 5 is out of range for a model with 2 labels"):
        textdata.encode_classification(table.map(lambda r: {"label": "5"}), tokenizer, num_labels=2)
    # chunked tokenisation gives what one call gives
    monkeypatch.setattr(textdata, "TOKENIZE_CHUNK", 1)
    chunked = textdata.tokenize_texts(tokenizer, ["the cat", "a dog ran", "sad"], max_length=3)
    assert chunked["input_ids"] == tokenizer(["the cat", "a dog ran", "sad"], truncation=True,
                                             max_length=3)["input_ids"]
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="has no rows|cannot read it"):
        textdata.load_table(tmp_path / "empty.csv")


def test_only_the_main_process_writes(workdir, lora_dir, monkeypatch):
    """Under torchrun every rank runs the command and holds the same result: rank 0 writes it."""
    import peft_mape.cli.app as app
    import peft_mape.cli.edit as edit

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(app, "is_main_process", lambda: False)
    monkeypatch.setattr(edit, "is_main_process", lambda: False)
    assert main(["unlearn", "--model", "model", "--forget", "forget.csv", "--out", "rank1", "--method", "ga",
                 "--max-steps", "1", "--quiet"]) == 0
    assert main(["evaluate", "--model", "model", "--forget", "forget.csv", "--test", "test.csv", "--out", "rank1.json",
                 "--quiet"]) == 0
    assert main(["edit", "--model", "model", "--adapter", "lora", "--train", "retain.csv", "--correct", "old.csv",
                 "new.csv", "--out", "rank1-edit", "--quiet"]) == 0
    assert not any((workdir / name).exists() for name in ("rank1", "rank1.json", "rank1-edit"))
