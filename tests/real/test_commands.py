"""The README's commands on SmolLM2-135M-Instruct, each as a user runs it (its own process), on
both backends where the backend has the command (fuse, generate, chat and serve are MLX's)."""

import json
import re
import subprocess
import sys
import time

import pytest
from marks import extended

ANSWER = "The capital of France is Paris."
QUESTION = "What is the capital of France?"


def mlxft(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "mlxft.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kwargs)


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def adapter_run(real_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("real-run") / "run"
    ok(mlxft("lora", "--recipe", "tallrec", "--model", real_model, "--backend", "mlx", "--out", out,
             "--set", "data.max_history=2", "--set", "data.k_shot=8", "--set", "data.max_valid_rows=4",
             "--set", "train.batch_size=4", "--set", "train.steps=2", "--set", "train.learning_rate=1e-3",
             "--set", "eval.every=0"))
    return out


def test_generate_and_chat_answer_through_the_chat_template(real_model):
    assert ANSWER in ok(mlxft("generate", "--model", real_model, "--prompt", QUESTION, "--max-tokens", "20"))
    chat = ok(mlxft("chat", "--model", real_model, "--max-tokens", "20", input=f"{QUESTION}\n/quit\n"))
    assert "(chat template)" in chat and ANSWER in chat


def test_eval_auc_of_a_trained_adapter_agrees_across_backends(real_model, adapter_run, tmp_path):
    from mlxft.config import load_run_config
    from mlxft.data.dataset import load_splits

    splits = load_splits(load_run_config(adapter_run / "config.yaml").data)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r.fields) + "\n" for r in splits.test[:16]))
    reports = {backend: json.loads(ok(mlxft("eval", "auc", "--model", real_model, "--adapter", adapter_run, "--data", data,
                                            "--backend", backend, "--json"))) for backend in ("mlx", "torch")}
    assert reports["mlx"]["rows"] == reports["torch"]["rows"] == 16 and 0 < reports["mlx"]["auc"] < 1
    assert reports["mlx"]["auc"] == pytest.approx(reports["torch"]["auc"], abs=1e-3)
    assert reports["mlx"]["loss"] == pytest.approx(reports["torch"]["loss"], rel=1e-3)


def test_eval_generate_answers_every_row_in_english(real_model, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in
                            [(QUESTION, "Paris."), ("What is 2 plus 2?", "4.")]))
    result = mlxft("eval", "generate", "--model", real_model, "--data", data, "--out", tmp_path / "out.json",
                   "--max-tokens", "16")
    ok(result)
    answers = [row["model_response"] for row in json.loads((tmp_path / "out.json").read_text())]
    assert "Paris" in answers[0] and all(sum(c.isalpha() for c in a) > 3 for a in answers), answers
    assert "empty" not in result.stderr


def test_fuse_dequantized_and_requantized(adapter_run, tmp_path):
    out = ok(mlxft("fuse", "--adapter", adapter_run, "--out", tmp_path / "fused"))
    assert float(re.search(r"by ([\d.e+-]+) of the largest", out).group(1)) < 1e-4, out
    out = ok(mlxft("fuse", "--adapter", adapter_run, "--out", tmp_path / "fused4", "--quantize", "4"))
    assert "4-bit" in out and "re-quantized to 4 bits" in out
    assert ANSWER in ok(mlxft("generate", "--model", tmp_path / "fused", "--prompt", QUESTION, "--max-tokens", "20"))


def test_serve_answers_the_openai_client(real_model):
    openai = pytest.importorskip("openai")
    server = subprocess.Popen([sys.executable, "-m", "mlxft.cli", "serve", "--model", str(real_model), "--port", "0",
                               "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            found = re.search(r"at (http://\S+)", line)
            url = found.group(1) if found else None
        assert url, "the server did not say where it listens"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.chat.completions.create(model=client.models.list().data[0].id, temperature=0, max_tokens=20,
                                               messages=[{"role": "user", "content": QUESTION}])
        assert reply.choices[0].message.content.strip() == ANSWER
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=reply.model, temperature=0, max_tokens=20, stream=True, messages=[{"role": "user", "content": QUESTION}])
            if chunk.choices)
        assert streamed.strip() == ANSWER
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_data_inspect_counts_with_the_real_tokenizer(real_model):
    report = json.loads(ok(mlxft("data", "inspect", "data/alpaca-sample.json", "--tokenizer", real_model, "--json")))
    assert report["rows"] > 0 and report["schema"] == "alpaca"


def test_eval_rank_scores_mind_impressions(real_model, adapter_run):
    report = json.loads(ok(mlxft("eval", "rank", "--model", real_model, "--adapter", adapter_run, "--data",
                                 "data/mind-sample", "--max-impressions", "6", "--max-history", "3", "--json")))
    assert report["impressions"] + report["skipped_one_class"] == 6 and report["impressions"] > 0
    assert report["candidates"] > 6 and 0 < report["mrr"] <= 1


def test_bench_runs_the_same_steps_on_both_backends(real_model, tmp_path):
    ok(mlxft("bench", "--workload", "lora", "--backends", "mlx,torch", "--model", real_model, "--steps", "1",
             "--warmup", "0", "--batch-size", "2", "--seq-len", "256", "--threads", "2", "--set", "data.max_history=2",
             "--out", tmp_path / "bench"))
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    mlx, torch = report["rows"]
    assert mlx["available"] and torch["available"] and mlx["tokens_per_second"] > 0
    assert mlx["last_loss"] == pytest.approx(torch["last_loss"], abs=1e-3)  # the same work on both


@extended
def test_sweep_trains_and_scores_each_shot_count(real_model, tmp_path):
    ok(mlxft("sweep", "--recipe", "tallrec", "--model", real_model, "--backend", "torch", "--shots", "8", "--seeds", "0",
             "--out", tmp_path / "sweep", "--set", "data.max_history=2", "--set", "train.steps=2",
             "--set", "train.batch_size=4", "--set", "eval.every=0", "--set", "data.max_valid_rows=8"))
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["table"]
    assert [row["k"] for row in table] == [8] and 0 < table[0]["auc_mean"] < 1
    assert (tmp_path / "sweep" / "sweep.md").read_text().startswith("Test AUC of `tallrec`")
