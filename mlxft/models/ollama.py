"""Ollama's local model store, read (a model's GGUF blob) and written for (a Modelfile).

    mlxft lora --recipe tallrec --model ollama:smollm2:135m     # the store's GGUF, converted once
    mlxft export gguf runs/tallrec-.../ --out tallrec.gguf --ollama tallrec
    ollama create tallrec -f Modelfile                          # the Modelfile written beside it

The store is $OLLAMA_MODELS or ~/.ollama/models: manifests/<registry>/<namespace>/<model>/<tag>
(JSON naming the layers by digest) and blobs/sha256-<digest>.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlxft.errors import UserError

MODEL_LAYER = "application/vnd.ollama.image.model"


def store() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def model_file(spec: str) -> Path:
    """The GGUF blob of `ollama:NAME[:TAG]` in the local store, as its manifest names it. NAME is a
    library model (smollm2), a user's (user/model) or another registry's (host/user/model); TAG
    defaults to latest, as in `ollama run`."""
    name = spec.removeprefix("ollama:")
    model, _, tag = name.partition(":")
    parts = model.split("/")
    if not model or not all(parts) or len(parts) > 3:
        raise UserError(f"--model {spec}: expected ollama:NAME or ollama:NAME:TAG, like ollama:smollm2:135m")
    host, namespace, repo = {1: ["registry.ollama.ai", "library", *parts], 2: ["registry.ollama.ai", *parts], 3: parts}[len(parts)]
    root = store()
    manifest = root / "manifests" / host / namespace / repo / (tag or "latest")
    if not manifest.is_file():
        raise UserError(f"--model {spec}: not in the Ollama store {root} (no {manifest.relative_to(root)}); "
                        f"run `ollama pull {name}` first, or set OLLAMA_MODELS")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER)
    except (ValueError, KeyError, TypeError, StopIteration):
        raise UserError(f"--model {spec}: {manifest} is not an Ollama manifest with a model layer") from None
    blob = root / "blobs" / str(digest).replace(":", "-")
    if not blob.is_file():
        raise UserError(f"--model {spec}: the manifest names {blob.name}, which is not in {root / 'blobs'}")
    return blob


# Chat templates Ollama's Go templates can say, recognised by their markers: how a turn of a role
# opens and closes, and the stop strings. Others get no TEMPLATE line: `ollama create` then picks a
# template itself from the GGUF's tokenizer.chat_template.
TURN_FORMS = [
    ("<|im_start|>", "<|im_start|>{role}\n", "<|im_end|>\n", ["<|im_end|>", "<|im_start|>"]),
    ("<|start_header_id|>", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", ["<|eot_id|>", "<|start_header_id|>"]),
    ("<|end|>", "<|{role}|>\n", "<|end|>\n", ["<|end|>", "<|user|>"]),  # phi-3's and the built-in model's
]


def default_system(tokenizer, opening: str, closing: str) -> str | None:
    """The system prompt the chat template adds when a chat has none (SmolLM2's "You are a helpful
    AI assistant named SmolLM ..."), read off a rendering of one user turn."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False, add_generation_prompt=True)
    start = opening.format(role="system")
    bos = getattr(tokenizer, "bos_token", None) or ""
    if bos and not start.startswith(bos):  # SmolLM2's BOS is <|im_start|> itself
        rendered = rendered.removeprefix(bos)
    if not rendered.startswith(start):
        return None
    end = rendered.find(closing, len(start))
    return rendered[len(start):end] if end >= 0 else None


def go_template(tokenizer) -> tuple[str, list[str]] | None:
    """Ollama's TEMPLATE (Go text/template) that renders what the tokenizer's chat template renders
    (BOS aside: llama.cpp adds it when tokenizing), and its stop strings; None for a template of
    another form. The system turn is .System, else the template's default system prompt."""
    chat_template = tokenizer.chat_template or ""
    for marker, opening, closing, stops in TURN_FORMS:
        if marker not in chat_template:
            continue
        def turn(role, text):
            return opening.format(role=role) + text + closing
        default = default_system(tokenizer, opening, closing)
        if default is not None and ("{{" in default or '"""' in default):
            return None  # would need escaping that a Modelfile cannot hold
        # No {{- trims: a turn's closing newline is part of what the model saw.
        system = "{{ if .System }}" + turn("system", "{{ .System }}")
        system += ("{{ else }}" + turn("system", default) if default is not None else "") + "{{ end }}"
        messages = ('{{ range .Messages }}{{ if eq .Role "user" }}' + turn("user", "{{ .Content }}")
                    + '{{ else if eq .Role "assistant" }}' + turn("assistant", "{{ .Content }}") + "{{ end }}{{ end }}")
        return system + messages + opening.format(role="assistant"), stops
    return None


def modelfile(gguf_name: str, tokenizer, adapter: str | None = None) -> str:
    """A Modelfile for `ollama create NAME -f Modelfile`: FROM the model file (and ADAPTER a LoRA
    GGUF on it), the TEMPLATE of its chat template, and stops."""
    lines = [f"FROM {gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    template = go_template(tokenizer) if tokenizer.chat_template else None
    stops = []
    if template:
        lines.append(f'TEMPLATE """{template[0]}"""')
        stops = template[1]
    for stop in dict.fromkeys([*stops, *([tokenizer.eos_token] if tokenizer.eos_token else [])]):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"
