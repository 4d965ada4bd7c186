"""Downstream evaluation: olm's lm-eval model against lm-eval's hf model on the exported weights, lm-eval's own CLI
on an olm model, olm's offline tasks, `olm eval`, and the in-loop callback (metrics.csv, W&B, summary, resume)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from olm.eval.run import go_offline  # noqa: E402

go_offline()  # before lm-eval or datasets are imported below: nothing here may reach the network

import olm  # noqa: E402
from olm.cli import main as olm_main  # noqa: E402
from olm.eval.harness import OlmLM  # noqa: E402
from olm.eval.run import evaluate, flat_metrics, resolve_tasks  # noqa: E402
from olm.zoo import preset_config  # noqa: E402

BIN = Path(sys.executable).parent
SOURCE = Path(olm.__file__).parent / "registry.py"  # some Python text to train a tokenizer on and to score


def _instance(kind, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small llama (random weights) with a BPE tokenizer: olm's model dir and its Hugging Face export."""
    from olm.data.tokenizers import HFTokenizer, train_bpe

    root = tmp_path_factory.mktemp("exported")
    text = SOURCE.read_text()
    tokenizer = HFTokenizer(train_bpe([text], 320), "bpe", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = olm.build_model({**preset_config("llama_tiny"), "vocab_size": tokenizer.vocab_size})
    model.save(root / "olm")
    tokenizer.save(root / "olm" / "tokenizer")
    assert olm_main(["convert", "--to-hf", str(root / "olm"), "--out", str(root / "hf")]) == 0
    return root / "olm", root / "hf", text


def test_loglikelihoods_equal_lm_eval_hf_model_on_the_export(exported):
    from lm_eval.models.huggingface import HFLM

    model_dir, hf_dir, text = exported
    ours = OlmLM(path=str(model_dir), device="cpu", dtype="float32", batch_size=3)
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=3)
    assert ours.max_length == theirs.max_length == 64 and ours.eot_token_id == theirs.eot_token_id
    lines = text.splitlines()
    pairs = [
        ("def build(kind, spec):\n", "    return registry[kind](**spec)"),
        ("import os", " path"),  # a one-token continuation
        ("x = 1 ", "+ 2"),  # the trailing space moves to the continuation
        ("", "class Registry:\n    pass"),  # empty context: conditioned on the end-of-text token
        ("\n".join(lines[:40]), "\n" + lines[40]),  # longer than the window: truncated from the left
        ("import os", " sys"),  # shares its context with the second request
    ]
    requests = [_instance("loglikelihood", pair) for pair in pairs]
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert [g for _, g in got] == [g for _, g in want]
    assert torch.allclose(torch.tensor([s for s, _ in got]), torch.tensor([s for s, _ in want]), atol=1e-4, rtol=0)
    assert all(score < 0 for score, _ in got)

    rolling = [_instance("loglikelihood_rolling", ("\n".join(lines[:30]),)), _instance("loglikelihood_rolling",
                                                                                     ("a = 1",))]
    assert torch.allclose(torch.tensor(ours.loglikelihood_rolling(rolling)),
                          torch.tensor(theirs.loglikelihood_rolling(rolling)), atol=1e-4, rtol=0)

    greedy = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    generations = [_instance("generate_until", (context, greedy)) for context in ("def ", "class A:\n", "def ")]
    got = ours.generate_until(generations)
    assert got == theirs.generate_until(generations)
    assert got[0] == got[2] and all("\n\n" not in g for g in got)


def _score(model_dir, context, choices):
    """The summed log-probabilities of each choice after the context, with a plain forward pass."""
    from olm.checkpoint import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(model_dir), require_tokenizer=True)
    model.eval()
    scores = []
    for choice in choices:
        whole, ctx = tokenizer.encode(context + choice), tokenizer.encode(context)
        with torch.no_grad():
            logprobs = model(torch.tensor([whole]))[0, :, : model.vocab_size].log_softmax(-1)
        scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
    return scores


def test_lm_eval_cli_runs_an_olm_model_on_a_local_task(exported, tmp_path):
    model_dir, _, _ = exported
    rows = [{"question": "def add(a, b):\n    return", "choices": [" a + b", " None", " registry"], "answer": 0},
            {"question": "import", "choices": [" os", " sys"], "answer": 1},
            {"question": "class Registry:\n", "choices": ["    pass", "    def get(self):"], "answer": 1}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(f"""task: local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'data.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
""")
    # device in --model_args and lm-eval's own --device: the model's args win (lm-eval would pass device twice)
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "olm",
                           "--model_args", f"path={model_dir},device=cpu",
                           "--tasks", "local_choice", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
                           "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    expected = sum(max(range(len(r["choices"])), key=_score(model_dir, r["question"], r["choices"]).__getitem__)
                   == r["answer"] for r in rows) / len(rows)
    assert result["results"]["local_choice"]["acc,none"] == pytest.approx(expected)
    assert result["config"]["model"] == "olm"


def test_shipped_tasks_are_offline_deterministic_and_at_chance_untrained(tmp_path):
    from olm.data import ByteTokenizer
    from olm.eval.tasks import shipped_tasks_dir

    first, again = shipped_tasks_dir(tmp_path / "a"), shipped_tasks_dir(tmp_path / "b")
    for name in ("olm_next_line.jsonl", "olm_identifier.jsonl"):
        assert (first / name).read_bytes() == (again / name).read_bytes()
    items = [json.loads(line) for line in (first / "olm_next_line.jsonl").read_text().splitlines()]
    assert len(items) == 1000 and all(len(set(item["choices"])) == 4 for item in items)
    assert {item["label"] for item in items} == {0, 1, 2, 3}
    names = [json.loads(line) for line in (first / "olm_identifier.jsonl").read_text().splitlines()]
    assert all(item["target"] in item["context"] for item in names)
    # An untrained model is at chance on the next-line task: acc_norm within 3 standard errors of 1/4.
    torch.manual_seed(0)
    model = olm.build_model(dict(name="lm", vocab_size=256, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=256))
    tasks = resolve_tasks(["olm_next_line"], cache_dir=str(tmp_path / "a"))
    metrics = flat_metrics(evaluate(OlmLM(model=model, tokenizer=ByteTokenizer(), batch_size=32), tasks))
    assert abs(metrics["olm_next_line/acc_norm"] - 0.25) < 3 * (0.25 * 0.75 / 1000) ** 0.5


def test_bad_task_names_and_missing_data_are_one_line(tmp_path, capsys):
    from olm.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        resolve_tasks(["olm_nextline"], cache_dir=str(tmp_path))
    assert str(err.value) == "--tasks: task 'olm_nextline' is not known to lm-eval or olm; closest: olm_next_line"
    with pytest.raises(ConfigError) as err:
        resolve_tasks(["hellaswg"], cache_dir=str(tmp_path))
    assert "task 'hellaswg' is not known to lm-eval or olm; closest: hellaswag" in str(err.value)
    with pytest.raises(ConfigError) as err:  # in lm-eval's registry, but its data is not on this machine
        resolve_tasks(["hellaswag"], cache_dir=str(tmp_path))
    assert str(err.value).startswith("task 'hellaswag' needs the Hugging Face dataset 'Rowan/hellaswag' in the "
                                     "local cache (")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gone.yaml").write_text(f"task: gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                                   f"    test: {tmp_path / 'missing.jsonl'}\ntest_split: test\n"
                                                   "output_type: loglikelihood\ndoc_to_text: a\ndoc_to_target: b\n")
    with pytest.raises(ConfigError) as err:
        resolve_tasks(["gone"], [str(tmp_path / "tasks")], cache_dir=str(tmp_path))
    assert str(err.value) == f"task 'gone': its data file '{tmp_path / 'missing.jsonl'}' does not exist"
    for argv, message in {
        ("--tasks", "olm", "--limit", "0"): "error: --limit=0 must be a positive integer (items per task)",
        ("--tasks", "olm", "--out", str(tmp_path / "summary.json")): "error: --out ",
    }.items():
        assert olm_main(["eval", str(tmp_path), *argv]) == 2
        err_line = capsys.readouterr().err.strip()
        assert err_line.startswith(message) and "\n" not in err_line


# A small model on BPE-1024 tokens: after 200 steps it is well above chance on olm_next_line (about 0.31).
TRAIN = ["model=lm_tiny", "model.embed_dim=64", "model.num_heads=4", "data.tokenizer=bpe",
         "data.tokenizer_vocab_size=1024", "data.seq_len=128", "data.batch_size=16", "data.val_batches=2",
         "trainer=cpu", "trainer.val_check_interval=100", "trainer.log_every_n_steps=50",
         "optim=adamw", "optim.lr=6e-3",  # the recipe the chance bound was measured with
         "trainer.enable_progress_bar=false", "sample.max_new_tokens=0", "logger=wandb",
         "callbacks.eval.tasks=[olm_next_line,olm_identifier]", "callbacks.eval.every_n_steps=100",
         "callbacks.eval.limit=1000"]


def _train(args, cache_dir):
    proc = subprocess.run([str(BIN / "olm-train"), *TRAIN, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OLM_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_in_loop_eval_logs_resumes_and_a_trained_model_beats_chance(tmp_path):
    from scipy.stats import binomtest

    from wandb_records import summarize

    run_dir = tmp_path / "run"
    _train(["trainer.max_steps=100", "scheduler.total_steps=200", f"hydra.run.dir={run_dir}"], tmp_path / "cache")
    proc = _train(["resume=auto", f"hydra.run.dir={run_dir}", "trainer.max_steps=200"], tmp_path / "cache")
    assert "downstream (callbacks.eval): olm_identifier/acc " in proc.stdout

    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/olm_next_line/acc_norm")]
    # Each once (the resumed run continued at 200), in the rows of its step's validation (Lightning's step - 1).
    assert [int(r["step"]) for r in rows] == [99, 199]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval/olm_next_line/acc_norm"] == pytest.approx(float(rows[-1]["eval/olm_next_line/acc_norm"]))
    assert summary["eval/olm_identifier/acc"] == pytest.approx(float(rows[-1]["eval/olm_identifier/acc"]))

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    history = [h for f in files for h in summarize(f)["history"] if "eval/olm_next_line/acc_norm" in h]
    assert [h["trainer/global_step"] for h in history] == [99, 199]

    # 200 steps: the next-line task above chance (1/4) on its 1000 items, beyond the noise of a guess.
    correct = round(summary["eval/olm_next_line/acc_norm"] * 1000)
    assert binomtest(correct, 1000, 0.25, alternative="greater").pvalue < 1e-3, summary

    # `olm eval` on the run dir (its exported model) gives the callback's final number.
    out = tmp_path / "eval.json"
    assert olm_main(["eval", str(run_dir), "--tasks", "olm_next_line", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["metrics"]["olm_next_line/acc_norm"] == pytest.approx(summary["eval/olm_next_line/acc_norm"],
                                                                       abs=1e-9)
