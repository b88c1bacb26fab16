"""`mlxft serve`'s server: the standard library's ThreadingHTTPServer holding the model's scheduler,
with mlxft.serve.handler answering each connection and mlxft.serve.options reading the CLI's.

    GET    /                      the chat page
    GET    /health                {"status": "ok", "model": ...}
    GET    /v1/models             the base model and every adapter served
    POST   /v1/chat/completions   OpenAI chat completions, streamed (SSE) or not
    POST   /v1/completions        OpenAI text completions, streamed (SSE) or not
    POST   /v1/adapters           {"name", "path"}: serve one more adapter (needs --api-key)
    DELETE /v1/adapters/NAME      stop serving an adapter (needs --api-key)

Each connection gets a thread, so /health answers while answers are generated; the model runs on
one thread of its own, where requests join and leave one running batch between decode steps
(mlxft.serve.scheduler; a generator that can only stream one answer at a time is served one request
at a time, mlxft.serve.worker). Every answer is JSON, errors included; a connection that sends
nothing for `read_timeout` seconds is closed; nothing of an internal error's text reaches a
client (it goes to the log). With an API key, every /v1 request must carry
`Authorization: Bearer KEY`; without one, adapters cannot be added or removed over HTTP.

CORS is off: a web page from another origin cannot read an answer, nor send a request with a
JSON body or an API key (its preflight gets no Access-Control-* headers). `cors_origins` names the
origins that may (`*` for any); only a request whose Origin is one of them gets the headers.

Why the standard library and not an async server (uvicorn + starlette): what limits this server
is the model thread, not connection handling. A thread per connection costs a few hundred KB and
spends its time blocked on a queue or a socket, so 64 streaming clients are 64 idle threads; the
decode loop never waits on a client, since pieces go through a queue and a client that stops
reading only blocks its own thread until the read timeout. An event loop would save those threads
and add a dependency, a second concurrency model beside the model thread, and its own answers to
malformed requests (h11 answers a garbled request line in plain text, where this server answers
JSON 4xx as tests/test_serve_fuzz.py checks). benchmarks/serve_load.py measures the whole stack
against mlx-lm's server, which is also built on ThreadingHTTPServer.
"""

from __future__ import annotations

import socket
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

from mlxft.conversation import render_messages, resolve_template
from mlxft.errors import UserError
from mlxft.generation import Sampling
from mlxft.serve.handler import Handler
from mlxft.serve.scheduler import BatchScheduler
from mlxft.serve.worker import SerialScheduler

READ_TIMEOUT = 30.0  # seconds a client may stay silent while sending a request (or reading an answer)
MAX_BATCH = 32  # answers generated at once; mlx-lm's server decodes 32 at once by default too
MAX_QUEUE = 256  # requests waiting for a place in the batch before new ones get HTTP 429


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many clients connect at once; they wait for the model, not for accept()

    def __init__(self, address, generator, *, model_id: str, template: str = "auto", api_key: str | None = None, log=None,
                 read_timeout: float = READ_TIMEOUT, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE,
                 adapters: dict[str, str | Path] | None = None, default_adapter: str | Path | None = None,
                 cors_origins: tuple[str, ...] = (), prompt_cache_bytes: int | None = None, warm_prompt: str | None = None):
        # Everything that can fail on the user's input comes before binding: no socket is left open.
        self.template = resolve_template(template, generator.tokenizer)
        self.generator = generator
        self.model_id = model_id
        self.scheduler = make_scheduler(generator, max_batch, max_queue, log, bool(adapters) or default_adapter is not None,
                                        prompt_cache_bytes)
        try:
            if default_adapter is not None:
                self.scheduler.add_adapter(model_id, default_adapter, default=True)
            for name, path in (adapters or {}).items():
                if name == model_id:
                    raise UserError(f"--adapter {name}=...: '{name}' is the name of the model served; pick another")
                self.scheduler.add_adapter(name, path)
            self.warmed_tokens = self.warm(warm_prompt) if warm_prompt else 0
            if ":" in address[0]:
                self.address_family = socket.AF_INET6  # an IPv6 literal such as ::1
            super().__init__(address, Handler)
        except BaseException:
            self.scheduler.stop()
            raise
        self.api_key = api_key
        self.log = log
        self.read_timeout = read_timeout
        self.cors_origins = tuple(cors_origins)
        self.created = int(time.time())

    def warm(self, system: str) -> int:
        """Prefill `system` as the system prompt of a chat, for the model served and each adapter, so
        that the first chats behind it hit the prompt cache (mlx-lm #1178). Returns the tokens filed
        per model: the rendered chat up to where the user's message begins."""
        if getattr(self.scheduler, "prompt_cache", None) is None:
            raise UserError("--warm-prompt fills the prompt cache, which this server does not have (MLX only, and not "
                            "with --prompt-cache-bytes 0)")
        marker = "\x00mlxft-user\x00"  # the user's message is cut off here: what follows differs per chat
        rendered = render_messages([{"role": "system", "content": system}, {"role": "user", "content": marker}],
                                   self.template, self.generator.tokenizer)
        ids = self.generator.encode(rendered.split(marker)[0])
        for name in [None, *self.model_names()[1:]]:  # None: the default model (the base, or --adapter PATH)
            for _ in self.scheduler.submit(lambda: ids, Sampling(max_tokens=1), name):
                pass  # the prompt is filed when its prefill ends; one token is answered and dropped
        return len(ids)

    def model_names(self) -> list[str]:
        """The default model first, then the adapters served by name."""
        return [self.model_id, *(name for name in self.scheduler.adapter_names() if name != self.model_id)]

    def server_close(self):
        super().server_close()
        self.scheduler.stop()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def make_server(generator, *, host: str = "127.0.0.1", port: int = 8080, model_id: str | None = None,
                template: str = "auto", api_key: str | None = None, log=None, read_timeout: float = READ_TIMEOUT,
                max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE, adapters: dict[str, str | Path] | None = None,
                default_adapter: str | Path | None = None, cors_origins: tuple[str, ...] = (),
                prompt_cache_bytes: int | None = None, warm_prompt: str | None = None) -> ModelServer:
    """`adapters`: {name: adapter folder} served beside the base, picked by a request's "model";
    `default_adapter`: the adapter a request that names no model (or the model served) gets;
    `cors_origins`: the web origins whose pages may call the API (`*`: any), none by default;
    `prompt_cache_bytes`: the prompt cache's bound (None: a tenth of the machine's memory; 0: none);
    `warm_prompt`: a system prompt prefilled into the cache for every model served, before the first request."""
    return ModelServer((host, port), generator, model_id=model_id or generator.name, template=template,
                       api_key=api_key, log=log, read_timeout=read_timeout, max_batch=max_batch, max_queue=max_queue,
                       adapters=adapters, default_adapter=default_adapter, cors_origins=cors_origins,
                       prompt_cache_bytes=prompt_cache_bytes, warm_prompt=warm_prompt)


def make_scheduler(generator, max_batch: int, max_queue: int, log, adapters: bool, prompt_cache_bytes: int | None = None):
    """Continuous batching when the generator offers a batch engine, else one request at a time
    with its stream() (a backend without batching still serves, its one model only)."""
    from mlxft.cpu_share import CpuShare

    engine_of = getattr(generator, "batch_engine", None)
    engine = engine_of() if callable(engine_of) else None
    # Fewer compute threads while other processes (the clients among them) take cores; said in the log.
    threads = CpuShare(log or (lambda message: None))
    if engine is None:
        if adapters:
            raise UserError("this backend serves one request at a time and no adapters by name (NAME=PATH, --adapters-dir); "
                            "give one adapter as --adapter PATH, or serve with --backend mlx")
        return SerialScheduler(generator, max_queue, threads)
    if hasattr(engine, "remember") and prompt_cache_bytes != 0:
        from mlxft.serve.prompt_cache import PromptCache, default_bytes

        engine.prompt_cache = PromptCache(default_bytes() if prompt_cache_bytes is None else prompt_cache_bytes)
    return BatchScheduler(engine, max_batch=max_batch, max_queue=max_queue, log=log, threads=threads)
