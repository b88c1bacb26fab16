"""A stand-in LLM judge for the tests (the fake_judge fixture in conftest.py serves it): it
answers Ollama's /api/chat and OpenAI's /v1/chat/completions with the replies a test sets."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


class FakeJudge(BaseHTTPRequestHandler):
    replies: list = []
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body, self.headers.get("Authorization")))
        content = type(self).replies[len(type(self).requests) - 1]
        if self.path == "/api/chat":
            payload = {"model": body["model"], "message": {"role": "assistant", "content": content}, "done": True}
        elif self.path == "/v1/chat/completions":
            payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        else:
            self.send_error(404)
            return
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass
