"""The LLM judge against fake Ollama and OpenAI-compatible servers on loopback."""

import json

import pytest
from click.testing import CliRunner
from judge_server import FakeJudge

from mlxft.cli import cli
from mlxft.errors import UserError
from mlxft.eval.judge import judge, parse_score


@pytest.mark.parametrize("reply, score", [
    ("85", 85.0),
    ("Score: 70/100", 70.0),
    ("<think>The reference says 12, the answer says 13... maybe 40?</think>\n\n90", 90.0),
    ("<THINK>multi\nline 5</THINK> 7.5", 7.5),
    ("I would say 100.", 100.0),
    ("1000", None),  # out of range, and not the 100 inside it
    ("no idea", None),
    ("<think>still thinking about 50", None),  # never got to the answer
    ("", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


ROWS = [{"instruction": "Add 2 and 3.", "input": "", "output": "5", "model_response": "5"},
        {"instruction": "Capital of France?", "output": "Paris", "model_response": "Lyon"},
        {"prompt": "Say hi", "completion": "hi", "model_response": "hello"}]


def test_ollama_judge_reports_mean_histogram_and_unparseable(fake_judge):
    FakeJudge.replies = ["<think>5 is right</think>95", "10", "I cannot grade this"]
    judged, report = judge(ROWS, fake_judge, "qwen3:8b", api="ollama", seed=7)
    assert [r["judge_score"] for r in judged] == [95.0, 10.0, None]
    assert report["mean"] == pytest.approx(52.5) and report["count"] == 2
    assert report["unparseable"] == 1 and report["unparseable_rows"] == [2]
    assert report["histogram"]["90-100"] == 1 and report["histogram"]["10-20"] == 1
    path, body, _ = FakeJudge.requests[0]
    assert path == "/api/chat" and body["options"] == {"temperature": 0, "seed": 7} and body["stream"] is False
    assert "Add 2 and 3." in body["messages"][0]["content"] and "Reference answer:\n5" in body["messages"][0]["content"]


def test_openai_judge_through_the_cli(fake_judge, tmp_path):
    FakeJudge.replies = ["80", "0", "<think>hm</think>50"]
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(ROWS))
    result = CliRunner().invoke(cli, ["eval", "judge", "--responses", str(responses), "--judge-url", fake_judge + "/v1",
                                      "--judge-model", "m", "--api", "openai", "--api-key", "k", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["mean"] == pytest.approx(130 / 3) and report["unparseable"] == 0
    assert FakeJudge.requests[0][0] == "/v1/chat/completions" and FakeJudge.requests[0][2] == "Bearer k"
    assert FakeJudge.requests[0][1]["temperature"] == 0
    judged = json.loads((tmp_path / "responses.judged.json").read_text())
    assert [r["judge_score"] for r in judged] == [80.0, 0.0, 50.0]


def test_judge_mistakes_are_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot reach the judge"):
        judge(ROWS[:1], "http://127.0.0.1:9", "m")  # nothing listens on port 9
    with pytest.raises(UserError, match="model_response"):
        judge([{"instruction": "x", "output": "y"}], "http://127.0.0.1:9", "m")
