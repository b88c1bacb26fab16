"""Model folders and tokenizers: the built-in model, a local Hugging Face folder, or a hub id.

Both backends load from the folder this returns, so they see the same files and the same
tokenizer ids. Nothing here runs code from a model repository unless trust_remote_code is set.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxft.errors import UserError

BUILTIN = "builtin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")  # any one means "has a tokenizer"
# Everything a tokenizer may be saved as: copied along when a model folder is written.
TOKENIZER_OUTPUTS = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "special_tokens_map.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model_dir(name: str) -> Path:
    """The Hugging Face folder of any model name: 'builtin', a local folder, a .gguf file or
    `ollama:NAME[:TAG]` (converted once into the cache, see mlxft.models.gguf), or a hub id (downloaded
    or taken from the hub cache)."""
    if name == BUILTIN:
        from mlxft.models.builtin import ensure_builtin

        return ensure_builtin()
    if name.startswith("ollama:"):
        from mlxft.models import ollama
        from mlxft.models.gguf.read import gguf_folder

        return gguf_folder(ollama.model_file(name))
    if name.lower().endswith(".gguf"):
        from mlxft.models.gguf.read import gguf_folder

        return gguf_folder(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model {name}: is a file; name the folder that holds config.json and the weights")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model {name}: no such folder, and not a hub id of the form owner/name")
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, missing repo: all mean "cannot get this model"
        raise UserError(f"model {repo_id}: could not get it from the Hugging Face hub ({type(e).__name__}: {e})".splitlines()[0]) from None


def load_tokenizer(name_or_dir: str | Path, *, trust_remote_code: bool = False):
    """A transformers tokenizer for a model name or folder; a clear error when there is none."""
    if str(name_or_dir) == BUILTIN:
        from mlxft.models.builtin import ensure_builtin

        folder = ensure_builtin()
    else:
        folder = resolve_model_dir(str(name_or_dir))
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"model folder {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except ValueError as e:  # e.g. a tokenizer class that needs remote code
        raise UserError(f"model folder {folder}: cannot load its tokenizer ({e})".splitlines()[0]) from None


# Families whose model class (mlx-lm's and transformers') is `model.model`, the transformer, plus a
# plain head with nothing after it, so a backend can run the head on the scored positions only.
# Not granite: it divides the logits by `logits_scaling` after the head.
SPLIT_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2"}


def model_type(folder: str | Path) -> str:
    return json.loads((Path(folder) / "config.json").read_text()).get("model_type", "")


def check_model_folder(folder: Path) -> None:
    """What both backends need of a model folder, said in one line before either loads it."""
    if not (folder / "config.json").exists():
        raise UserError(f"model {folder}: no config.json (not a Hugging Face model folder)")
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"model {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if not list(folder.glob("*.safetensors")):
        raise UserError(f"model {folder}: no *.safetensors weights")


def mlx_config_overrides(config: dict) -> dict:
    """What mlx-lm must be told of a config.json it would otherwise misread, silently.

    transformers 5 writes the rotary settings as `rope_parameters: {rope_theta, rope_type, ...}`
    and no top-level `rope_theta`; mlx-lm reads only the top-level key and falls back to 10000,
    and an instruct model whose theta is 100000 then talks nonsense. The values go back where
    mlx-lm (and transformers 4) look for them."""
    overrides = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # one set for every layer (not gemma3's per-type sets)
        if "rope_theta" not in config:
            overrides["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default" and not config.get("rope_scaling"):
            overrides["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if "partial_rotary_factor" in rope and "partial_rotary_factor" not in config:
            overrides["partial_rotary_factor"] = rope["partial_rotary_factor"]
    return overrides


def pad_id(tokenizer) -> int:
    """Padding carries no loss, so any id works; prefer the tokenizer's own pad, then EOS."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
