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


# Chat templates Ollama's Go templates can say, recognised by their markers: (marker in the
# Jinja template, Go template, stop strings). Others get no TEMPLATE line: `ollama create` then
# picks a template itself from the GGUF's tokenizer.chat_template.
GO_TEMPLATES = [
    ("<|im_start|>",
     "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
     "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
     ["<|im_end|>", "<|im_start|>"]),
    ("<|start_header_id|>",
     "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
     "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
     "<|start_header_id|>assistant<|end_header_id|>\n\n",
     ["<|eot_id|>", "<|start_header_id|>"]),
    ("<|end|>",  # phi-3's and the built-in model's <|role|> ... <|end|>
     "{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
     "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
     ["<|end|>", "<|user|>"]),
]


def modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None) -> str:
    """A Modelfile for `ollama create NAME -f Modelfile` beside the GGUF file."""
    lines = [f"FROM ./{gguf_name}"]
    stops = []
    for marker, template, template_stops in GO_TEMPLATES:
        if chat_template and marker in chat_template:
            lines.append(f'TEMPLATE """{template}"""')
            stops = template_stops
            break
    for stop in dict.fromkeys([*stops, *([eos_token] if eos_token else [])]):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"
