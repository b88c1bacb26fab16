"""The HTTP handler of `mlxft serve` (mlxft.serve.server): routing, the API key, CORS, the OpenAI
routes, the adapter endpoints, and every answer as JSON (the standard library's own errors
included). A request that fails on its input gets a 4xx; a bug gets a 500 whose text says only
that (the traceback goes to the server's log).
"""

from __future__ import annotations

import hmac
import json
import re
import time
import traceback
from http.server import BaseHTTPRequestHandler
from typing import Protocol
from urllib.parse import unquote, urlsplit

from mlxft.conversation import render_messages
from mlxft.errors import UserError
from mlxft.generation import ContextTooLong, fit_to_context
from mlxft.serve.openai import ApiError, Completion, model_card, model_list, parse_chat, parse_completion, parse_json
from mlxft.serve.options import ADAPTER_NAME
from mlxft.serve.page import chat_page


class Served(Protocol):
    """What the handler reads of its server (mlxft.serve.server.ModelServer), named here so that
    the handler needs no import of the server that imports it."""

    read_timeout: float
    api_key: str | None
    model_id: str
    created: int
    scheduler: object
    generator: object
    template: str
    cors_origins: tuple[str, ...]
    log: object

    def model_names(self) -> list[str]: ...


MAX_BODY = 4 * 1024 * 1024  # a chat request is text; anything larger is a mistake or an attack
ROUTES = {
    "/": {"GET": "page"},
    "/health": {"GET": "health"},
    "/v1/models": {"GET": "models"},
    "/v1/chat/completions": {"POST": "chat_completions"},
    "/v1/completions": {"POST": "completions"},
    "/v1/adapters": {"POST": "add_adapter"},
}
ADAPTER_PATH = "/v1/adapters/"  # + NAME
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")  # an HTTP header name (RFC 9110's token)


def routes_for(path: str) -> dict | None:
    if path.startswith(ADAPTER_PATH) and len(path) > len(ADAPTER_PATH):
        return {"DELETE": "remove_adapter"}
    return ROUTES.get(path)


class Handler(BaseHTTPRequestHandler):
    server: Served
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
        methods = routes_for(path)
        if methods is None:
            self.send_json(404, ApiError(404, f"no such path: {path}", type="not_found_error", code="not_found").body())
            return
        allowed = ", ".join([*methods, *(["HEAD"] if "GET" in methods else []), "OPTIONS"])
        preflight = {"Access-Control-Allow-Methods": allowed, "Access-Control-Allow-Headers": self.allowed_headers(),
                     "Access-Control-Max-Age": "600"} if self.allowed_origin() else {}
        self.send_bytes(204, b"", None, {"Allow": allowed, **preflight})

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
            methods = routes_for(path)
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
        health = {"status": "ok", "model": self.server.model_id}
        cache = getattr(self.server.scheduler, "prompt_cache", None)
        if cache is not None:
            health["prompt_cache"] = cache.figures()
        self.send_json(200, health)

    def models(self) -> None:
        self.send_json(200, model_list(self.server.model_names(), self.server.created))

    def chat_completions(self) -> None:
        self.answer(parse_chat(self.read_json(), self.server.model_names()))

    def completions(self) -> None:
        self.answer(parse_completion(self.read_json(), self.server.model_names()))

    def add_adapter(self) -> None:
        self.require_admin()
        body = self.read_json()
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise ApiError(400, "'name' must be 1 to 64 letters, digits or . _ : - (starting with a letter or digit)",
                           code="invalid_value", param="name")
        if not isinstance(path, str) or not path:
            raise ApiError(400, "'path' must be the adapter's folder on the server's machine", code="invalid_value", param="path")
        if name in self.server.model_names():
            raise ApiError(409, f"'{name}' is already served; remove it first", code="model_exists", param="name")
        try:
            self.server.scheduler.add_adapter(name, path)
        except UserError as e:
            raise ApiError(400, str(e), code="invalid_value", param="path") from None
        self.send_json(200, model_card(name, int(time.time())))

    def remove_adapter(self) -> None:
        self.require_admin()
        name = unquote(urlsplit(self.path).path[len(ADAPTER_PATH):])
        if name == self.server.model_id:
            raise ApiError(400, f"'{name}' is the model this server was started with; it cannot be removed", code="invalid_value")
        if name not in self.server.model_names():
            raise ApiError(404, f"no adapter named '{name[:200]}' is served", type="not_found_error", code="model_not_found")
        try:
            self.server.scheduler.remove_adapter(name)
        except UserError as e:
            raise ApiError(404, str(e), type="not_found_error", code="model_not_found") from None
        self.send_json(200, {"id": name, "object": "model", "deleted": True})

    def require_admin(self) -> None:
        """Adding an adapter reads a folder on this machine: only a server with an API key (checked
        by authorize for every /v1 path) lets its clients do that."""
        if self.server.api_key is None:
            raise ApiError(403, "adapters can be added and removed only on a server started with --api-key",
                           type="permission_error", code="api_key_required")

    def answer(self, request) -> None:
        completion = Completion(request.chat, request.model or self.server.model_id)
        job = self.server.scheduler.submit(lambda: self.prompt_ids(request), request.sampling, request.model)
        try:
            items = iter(job)
            prompt_tokens = next(items)  # rendered and encoded: errors in the prompt are raised here
            if request.stream:
                self.send_events(completion, items, request.include_usage, prompt_tokens, job.has_more)
            else:
                text, finish, used, cached = [], "length", 0, 0
                for piece in items:
                    text.append(piece.text)
                    finish, used, cached = piece.finish_reason or finish, piece.completion_tokens, piece.cached_tokens
                self.send_json(200, completion.response("".join(text), finish, prompt_tokens, used, cached))
        finally:
            job.cancel()  # a client that left stops its generation at the next token

    def prompt_ids(self, request) -> list[int]:
        """Runs on the model's thread: the prompt rendered and encoded, max_tokens fitted to the context."""
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
        return ids

    def send_events(self, completion: Completion, pieces, include_usage: bool, prompt_tokens: int, has_more=lambda: False) -> None:
        """Server-sent events: `data: {chunk}` per piece, the finish reason, then `data: [DONE]`.
        Events are held while more pieces are already waiting (`has_more`) and written together:
        one socket write per batch of pieces, not per token."""
        self.streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # proxies such as nginx would hold the stream back
        self.end_headers()
        if completion.chat:
            self.send_event(completion.chunk(None, first=True))
        used = cached = 0
        held = []
        try:
            for piece in pieces:
                used, cached = piece.completion_tokens, piece.cached_tokens
                if piece.text:
                    held.append(event(completion.chunk(piece.text)))
                if piece.finish_reason:
                    held.append(event(completion.chunk(None, piece.finish_reason)))
                if held and not has_more():
                    self.wfile.write(b"".join(held))
                    held = []
            if held:
                self.wfile.write(b"".join(held))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise  # the client left (or stopped reading): answer() cancels the generation
        except Exception:  # the status line is gone: say it in the stream, as OpenAI does
            self.send_event(ApiError(500, "generation failed; the server's log has the details", type="server_error").body())
            raise
        if include_usage:
            self.send_event(completion.usage_chunk(prompt_tokens, used, cached))
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

    def allowed_origin(self) -> str | None:
        """What Access-Control-Allow-Origin says to this request: its Origin when --cors-origin
        names it (or `*`), else nothing."""
        origin = self.headers.get("Origin") if getattr(self, "headers", None) is not None else None
        if not origin or not self.server.cors_origins:
            return None
        if "*" in self.server.cors_origins:
            return "*"
        return origin if origin.lower() in self.server.cors_origins else None

    def allowed_headers(self) -> str:
        """The headers a preflight may announce: those it asks for when they are well-formed names
        (client libraries add their own, as the OpenAI SDK's x-stainless-*), else the two the API reads."""
        asked = [h.strip() for h in self.headers.get("Access-Control-Request-Headers", "").split(",") if h.strip()]
        if asked and all(HEADER_NAME.fullmatch(h) for h in asked):
            return ", ".join(asked)
        return "Authorization, Content-Type"

    def end_headers(self):
        origin = self.allowed_origin()
        if origin:  # every answer, errors and streams included: a page must be able to read its errors too
            self.send_header("Access-Control-Allow-Origin", origin)
        if self.server.cors_origins and "*" not in self.server.cors_origins:
            self.send_header("Vary", "Origin")  # the answer depends on it: a shared cache must not mix them up
        super().end_headers()

    def send_event(self, payload: dict) -> None:
        self.wfile.write(event(payload))

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


def event(payload: dict) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
