"""`mlxft eval generate` on a tiny model, and the judge client against a real `mlxft serve`."""

import json
import threading

from click.testing import CliRunner

from mlxft.cli import cli
from mlxft.data.templates import alpaca_prompt
from mlxft.eval.judge import judge

ROWS = [{"instruction": "Name a fruit.", "input": "", "output": "Apple."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hello.", "input": "", "output": "Hello."}]


def test_generate_adds_model_response_with_the_training_template(tiny_model_dir, tmp_path, monkeypatch):
    import mlxft.chat

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    prompts, original = [], mlxft.chat.stream_answer

    def recording(generator, prompt, sampling, write):
        prompts.append(prompt)
        return original(generator, prompt, sampling, write)

    monkeypatch.setattr(mlxft.chat, "stream_answer", recording)
    args = ["eval", "generate", "--model", str(tiny_model_dir), "--data", str(data), "--max-tokens", "6",
            "--temperature", "1.0", "--backend", "mlx"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    answered = json.loads((tmp_path / "a.json").read_text())
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in answered] == ROWS
    assert all(isinstance(r["model_response"], str) for r in answered)
    assert any(r["model_response"].strip() for r in answered)  # sampled, so not only newlines
    # Alpaca rows get the Alpaca prompt the model was trained on, with or without input.
    assert prompts == [alpaca_prompt(r["instruction"], r["input"]) for r in ROWS]
    # Seeded per row: the same command gives the same answers.
    CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text()) == answered


def test_judge_against_mlxft_serve(tiny_model_dir):
    from mlxft.backends.mlx.stream import load_generator
    from mlxft.serve.server import make_server

    server = make_server(load_generator(str(tiny_model_dir)), host="127.0.0.1", port=0, model_id="tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        rows = [{**r, "model_response": r["output"]} for r in ROWS]
        judged, report = judge(rows, url, "tiny", api="openai", seed=3)
    finally:
        server.shutdown()
        server.server_close()
    # A 2-layer random model is no judge: what matters is that every reply came back and was
    # either scored or counted as unparseable, never lost.
    assert len(judged) == 3 and all(isinstance(r["judge_reply"], str) for r in judged)
    assert report["count"] + report["unparseable"] == 3
    assert report["unparseable_rows"] == [i for i, r in enumerate(judged) if r["judge_score"] is None]
