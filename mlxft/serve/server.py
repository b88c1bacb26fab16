"""The HTTP side of `mlxft serve`, on the standard library's ThreadingHTTPServer.

    GET  /                      the chat page
    GET  /health                {"status": "ok", "model": ...}
    GET  /v1/models             the one model served
    POST /v1/chat/completions   OpenAI chat completions, streamed (SSE) or not
    POST /v1/completions        OpenAI text completions, streamed (SSE) or not

Each connection gets a thread, so /health answers while a long generation runs; the model runs on
one thread of its own (mlxft.serve.worker), one request at a time, so two answers never
interleave and mlx-lm's tokenizer and detokenizer state are never shared. Every answer is JSON,
errors included; a connection that sends nothing for `read_timeout` seconds is closed; nothing
of an internal error's text reaches a client (it goes to the log). With an API key, every /v1
request must carry `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from mlxft.conversation import render_messages, resolve_template
from mlxft.errors import UserError
from mlxft.generation import ContextTooLong, fit_to_context
from mlxft.serve.openai import ApiError, Completion, model_list, parse_chat, parse_completion, parse_json
from mlxft.serve.page import chat_page
from mlxft.serve.worker import ModelWorker

MAX_BODY = 4 * 1024 * 1024  # a chat request is text; anything larger is a mistake or an attack
READ_TIMEOUT = 30.0  # seconds a client may stay silent while sending a request (or reading an answer)
ROUTES = {
    "/": {"GET": "page"},
    "/health": {"GET": "health"},
    "/v1/models": {"GET": "models"},
    "/v1/chat/completions": {"POST": "chat_completions"},
    "/v1/completions": {"POST": "completions"},
}


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many clients connect at once; they wait for the model, not for accept()

    def __init__(self, address, generator, *, model_id: str, template: str = "auto", api_key: str | None = None, log=None,
                 read_timeout: float = READ_TIMEOUT):
        self.template = resolve_template(template, generator.tokenizer)  # before binding: a bad choice leaves no socket open
        if ":" in address[0]:
            self.address_family = socket.AF_INET6  # an IPv6 literal such as ::1
        super().__init__(address, Handler)
        self.generator = generator
        self.model_id = model_id
        self.api_key = api_key
        self.log = log
        self.read_timeout = read_timeout
        self.worker = ModelWorker()
        self.created = int(time.time())

    def server_close(self):
        super().server_close()
        self.worker.stop()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def make_server(generator, *, host: str = "127.0.0.1", port: int = 8080, model_id: str | None = None,
                template: str = "auto", api_key: str | None = None, log=None, read_timeout: float = READ_TIMEOUT) -> ModelServer:
    return ModelServer((host, port), generator, model_id=model_id or generator.name, template=template,
                       api_key=api_key, log=log, read_timeout=read_timeout)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class Handler(BaseHTTPRequestHandler):
    server: ModelServer
    server_version = "mlxft"
    default_request_version = "HTTP/1.0"  # answer a garbled request line with a status line and headers, not bare HTTP/0.9

    def setup(self):
        self.timeout = self.server.read_timeout  # StreamRequestHandler puts it on the socket
        self.head_only = False
        super().setup()

    def do_GET(self):
        self.route("GET")

    def do_HEAD(self):
        self.head_only = True  # GET's status and headers, no body
        self.route("GET")

    def do_OPTIONS(self):
        path = urlsplit(self.path).path
        methods = ROUTES.get(path)
        if methods is None:
            self.send_json(404, ApiError(404, f"no such path: {path}", type="not_found_error", code="not_found").body())
            return
        allowed = ", ".join([*methods, *(["HEAD"] if "GET" in methods else []), "OPTIONS"])
        self.send_bytes(204, b"", None, {"Allow": allowed})

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def do_DELETE(self):
        self.route("DELETE")

    def do_PATCH(self):
        self.route("PATCH")

    def route(self, method: str) -> None:
        path = urlsplit(self.path).path
        self.body_read = self.streaming = False
        try:
            if path == "/v1" or path.startswith("/v1/"):
                self.authorize()
            methods = ROUTES.get(path)
            if methods is None:
                raise ApiError(404, f"no such path: {path}", type="not_found_error", code="not_found")
            if method not in methods:
                raise ApiError(405, f"{path} takes {', '.join(methods)}, not {method}", code="method_not_allowed",
                               headers={"Allow": ", ".join(methods)})
            getattr(self, methods[method])()
        except ApiError as e:
            self.drain_body()
            self.send_json(e.status, e.body(), e.headers, quiet=True)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; nothing to answer
        except TimeoutError:
            self.close_connection = True  # a client that went silent mid-request or mid-answer
            if not self.streaming:
                self.send_json(408, ApiError(408, f"no data from the client for {self.server.read_timeout:g} s",
                                             code="request_timeout").body(), {"Connection": "close"}, quiet=True)
        except Exception:
            # A bug. The client learns only that; the traceback goes to the log, never to the client.
            self.close_connection = True
            self.log_error("internal error answering %s %s\n%s", method, path, traceback.format_exc())
            if not self.streaming:
                self.send_json(500, ApiError(500, "internal server error; the server's log has the details",
                                             type="server_error").body(), quiet=True)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own errors (a malformed request line or header, an unknown
        method), in JSON like every other answer instead of its HTML page."""
        self.close_connection = True
        if code == 501:  # an HTTP method this server does not take at all
            code, message = 405, f"the method {self.command!r} is not supported"
        text = message or explain or self.responses.get(code, ("error",))[0]
        try:
            self.send_json(code, ApiError(code, text, code="bad_request" if code == 400 else None).body(),
                           {"Connection": "close"}, quiet=True)
        except OSError:
            pass

    def authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                           type="invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # Routes -----------------------------------------------------------------------------------

    def page(self) -> None:
        self.send_bytes(200, chat_page(self.server.model_id).encode(), "text/html; charset=utf-8")

    def health(self) -> None:
        self.send_json(200, {"status": "ok", "model": self.server.model_id})

    def models(self) -> None:
        self.send_json(200, model_list(self.server.model_id, self.server.created))

    def chat_completions(self) -> None:
        self.answer(parse_chat(self.read_json(), self.server.model_id))

    def completions(self) -> None:
        self.answer(parse_completion(self.read_json(), self.server.model_id))

    def answer(self, request) -> None:
        completion = Completion(request.chat, self.server.model_id)
        job = self.server.worker.submit(lambda cancelled: self.generate(request, cancelled))
        try:
            items = iter(job)
            prompt_tokens = next(items)  # rendered and encoded: errors in the prompt are raised here
            if request.stream:
                self.send_events(completion, items, request.include_usage, prompt_tokens)
            else:
                text, finish, used = [], "length", 0
                for piece in items:
                    text.append(piece.text)
                    finish, used = piece.finish_reason or finish, piece.completion_tokens
                self.send_json(200, completion.response("".join(text), finish, prompt_tokens, used))
        finally:
            job.cancel()  # a client that left stops its generation at the next token

    def generate(self, request, cancelled):
        """Runs on the model's thread: the prompt's token count, then the answer's pieces."""
        server, generator = self.server, self.server.generator
        try:
            prompt = render_messages(request.messages, server.template, generator.tokenizer, request.input) \
                if request.chat else request.prompt
            ids = generator.encode(prompt)
            request.sampling.max_tokens = fit_to_context(len(ids), request.sampling.max_tokens, generator.context_length)
        except ContextTooLong as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="messages" if request.chat else "prompt") from None
        except UserError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        yield len(ids)
        if not cancelled.is_set():
            yield from generator.stream(ids, request.sampling)

    def send_events(self, completion: Completion, pieces, include_usage: bool, prompt_tokens: int) -> None:
        """Server-sent events: `data: {chunk}` per piece, the finish reason, then `data: [DONE]`."""
        self.streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # proxies such as nginx would hold the stream back
        self.end_headers()
        if completion.chat:
            self.send_event(completion.chunk(None, first=True))
        used = 0
        try:
            for piece in pieces:
                used = piece.completion_tokens
                if piece.text:
                    self.send_event(completion.chunk(piece.text))
                if piece.finish_reason:
                    self.send_event(completion.chunk(None, piece.finish_reason))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise  # the client left (or stopped reading): answer() cancels the generation
        except Exception:  # the status line is gone: say it in the stream, as OpenAI does
            self.send_event(ApiError(500, "generation failed; the server's log has the details", type="server_error").body())
            raise
        if include_usage:
            self.send_event(completion.usage_chunk(prompt_tokens, used))
        self.wfile.write(b"data: [DONE]\n\n")

    # Plumbing ---------------------------------------------------------------------------------

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411 if length is None else 400, "a JSON body with a Content-Length is required", code="invalid_json")
        if int(length) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
        self.body_read = True
        return parse_json(self.rfile.read(int(length)))

    def drain_body(self) -> None:
        """Read a body the error made us skip: closing a socket with unread input resets the
        connection, and the client would lose the error response."""
        length = self.headers.get("Content-Length", "")
        if not self.body_read and length.isdigit() and int(length) <= MAX_BODY:
            self.body_read = True
            try:
                self.rfile.read(int(length))
            except OSError:  # a client that announced more than it sent: answer, then hang up
                self.close_connection = True

    def send_event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def send_json(self, status: int, payload: dict, headers: dict | None = None, quiet: bool = False) -> None:
        try:
            self.send_bytes(status, json.dumps(payload).encode(), "application/json", headers)
        except OSError:
            if not quiet:
                raise

    def send_bytes(self, status: int, body: bytes, content_type: str | None, headers: dict | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not self.head_only:
            self.wfile.write(body)

    def log_message(self, format, *args):
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")
