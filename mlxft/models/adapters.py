"""The one adapter format on disk: PEFT's layout, shared by both backends.

    adapter_config.json          peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in]
                                 base_model.model.<module>.lora_B.weight [out, r]
                                 base_model.model.<module>.lora_magnitude_vector [out]  (DoRA only)

A reward model (mlxft.methods.reward) is task_type SEQ_CLS with modules_to_save ["score"], its head
saved whole as base_model.model.score.weight [1, hidden], as PEFT saves it.

Tensors here are numpy arrays keyed by module path ("model.layers.0.self_attn.q_proj"): (A, B),
and for DoRA (A, B, m), m being the magnitude of each output row; each backend converts to and
from its own arrays. Reading checks what users trip over: a path that is a file, an empty folder,
a Git LFS pointer instead of weights, a config that is not LoRA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxft.errors import UserError
from mlxft.files import staged_folder

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
LFS_MAGIC = b"version https://git-lfs"


@dataclass
class AdapterSpec:
    r: int
    alpha: float
    dropout: float
    target_modules: list[str]
    base_model: str
    layers: list[int] | None = None  # None: every block
    task_type: str = "CAUSAL_LM"  # SEQ_CLS: a reward model (mlxft.methods.reward), its head in modules_to_save
    modules_to_save: list[str] | None = None  # modules trained in full beside the adapter (PEFT's name)
    use_rslora: bool = False  # rank-stabilised LoRA: scaling alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  # DoRA: each output row of W + scaling * B @ A rescaled to a trained magnitude

    @property
    def scaling(self) -> float:
        return self.alpha / self.r ** 0.5 if self.use_rslora else self.alpha / self.r

    def to_peft(self) -> dict:
        config = {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "bias": "none",
            "base_model_name_or_path": self.base_model,
            "fan_in_fan_out": False,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "inference_mode": True,
        }
        if self.layers is not None:
            config["layers_to_transform"] = list(self.layers)
            config["layers_pattern"] = "layers"
        if self.modules_to_save:
            config["modules_to_save"] = list(self.modules_to_save)
        return config

    @classmethod
    def from_peft(cls, config: dict, where: str) -> AdapterSpec:
        if config.get("peft_type", "LORA") != "LORA":
            raise UserError(f"{where}: a {config['peft_type']} adapter; mlxft reads LoRA adapters")
        try:
            layers = config.get("layers_to_transform")
            return cls(
                r=int(config["r"]),
                alpha=float(config["lora_alpha"]),
                dropout=float(config.get("lora_dropout", 0.0)),
                target_modules=list(config["target_modules"]),
                base_model=str(config.get("base_model_name_or_path") or ""),
                layers=[layers] if isinstance(layers, int) else layers,
                task_type=str(config.get("task_type") or "CAUSAL_LM"),
                modules_to_save=list(config["modules_to_save"]) if config.get("modules_to_save") else None,
                use_rslora=bool(config.get("use_rslora", False)),
                use_dora=bool(config.get("use_dora", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: not a LoRA adapter config ({type(e).__name__}: {e})") from None


MAGNITUDE = "lora_magnitude_vector"  # PEFT's key for a DoRA layer's magnitude, saved without ".weight"


def save_adapter(folder: str | Path, spec: AdapterSpec, weights: dict[str, tuple[np.ndarray, ...]],
                 modules: dict[str, np.ndarray] | None = None) -> Path:
    """Write {module path: (A [r, in], B [out, r]) or, DoRA, (A, B, m [out])}, and the tensors of modules trained in full
    ({"score.weight": ...}, saved as PEFT saves modules_to_save), atomically: a temporary folder,
    then a rename."""
    from safetensors.numpy import save_file

    tensors = {f"{PREFIX}{name}": np.ascontiguousarray(value, dtype=np.float32) for name, value in (modules or {}).items()}
    for module, (a, b, *magnitude) in weights.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)
        if magnitude:
            tensors[f"{PREFIX}{module}.{MAGNITUDE}"] = np.ascontiguousarray(magnitude[0], dtype=np.float32)
    with staged_folder(folder) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(spec.to_peft(), indent=2))
    return Path(folder)


def adapter_folder(path: str | Path) -> Path:
    """The folder holding an adapter, given it or a run folder; one-line errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"adapter {path}: no such folder")
    if path.is_file():
        raise UserError(f"adapter {path}: is a file; name the folder that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not (path / CONFIG_FILE).exists():
        for candidate in (path / "adapter", path / "best", path / "last"):
            if (candidate / CONFIG_FILE).exists():
                return candidate
        if not any(path.iterdir()):
            raise UserError(f"adapter {path}: the folder is empty")
        raise UserError(f"adapter {path}: no {CONFIG_FILE} in this folder")
    return path


def whole_model_folder(path: str | Path) -> Path | None:
    """The model folder a full-fine-tuning run left where an adapter was expected (the path,
    else its best/, else last/), or None when the path holds an adapter or nothing of the kind."""
    path = Path(path)
    for candidate in (path, path / "adapter", path / "best", path / "last"):
        if (candidate / CONFIG_FILE).exists():
            return None
        if (candidate / "config.json").exists() and any(candidate.glob("*.safetensors")):
            return candidate
    return None


def load_adapter(path: str | Path, task_type: str | None = "CAUSAL_LM") -> tuple[AdapterSpec, dict[str, tuple[np.ndarray, ...]]]:
    """(spec, {module path: (A, B), or (A, B, m) for DoRA}) of a saved adapter; `task_type` is the kind the caller can
    use (None: any). The tensors of modules_to_save are read by load_saved_modules."""
    spec, tensors, where = read_adapter(path)
    if task_type is not None and spec.task_type != task_type:
        what = "a reward model (mlxft reward)" if spec.task_type == "SEQ_CLS" else f"a {spec.task_type} adapter"
        raise UserError(f"adapter {where.parent}: {what}, not a {task_type} adapter; "
                        + ("score with it through `mlxft eval reward`" if spec.task_type == "SEQ_CLS" else "use another adapter"))
    saved = tuple(f"{PREFIX}{m}." for m in spec.modules_to_save or ())
    weights: dict[str, list] = {}
    magnitudes: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if saved and key.startswith(saved):
            if spec.task_type != "SEQ_CLS":  # a whole lm_head or embedding would be silently dropped
                raise UserError(f"adapter {where}: it trains '{key[len(PREFIX):].rsplit('.', 1)[0]}' in full "
                                "(modules_to_save); mlxft reads LoRA layers, and a reward model's head")
            continue
        if spec.use_dora and key.startswith(PREFIX) and key.endswith(f".{MAGNITUDE}"):
            magnitudes[key[len(PREFIX):-len(MAGNITUDE) - 1]] = value
            continue
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            because = " (a DoRA magnitude, but the config has no use_dora)" if key.endswith(f".{MAGNITUDE}") else ""
            raise UserError(f"adapter {where}: unexpected tensor '{key}'{because}")
        module, part = key[len(PREFIX):].rsplit(".lora_", 1)
        weights.setdefault(module, [None, None])["AB".index(part[0])] = value
    incomplete = [m for m, (a, b) in weights.items() if a is None or b is None]
    if incomplete:
        raise UserError(f"adapter {where}: '{incomplete[0]}' lacks its lora_A or lora_B tensor")
    if not spec.use_dora:
        return spec, {m: (a, b) for m, (a, b) in weights.items()}
    unmatched = sorted(set(weights) ^ set(magnitudes))
    if unmatched:
        what = "lacks its" if unmatched[0] in weights else "has only a"
        raise UserError(f"adapter {where}: '{unmatched[0]}' {what} {MAGNITUDE} tensor (use_dora: every layer has A, B and one)")
    return spec, {m: (a, b, magnitudes[m]) for m, (a, b) in weights.items()}


def load_saved_modules(path: str | Path) -> dict[str, np.ndarray]:
    """{"score.weight": ...}: the tensors of an adapter's modules_to_save ({} when it has none)."""
    spec, tensors, _ = read_adapter(path)
    saved = tuple(f"{PREFIX}{m}." for m in spec.modules_to_save or ())
    return {key[len(PREFIX):]: value for key, value in tensors.items() if saved and key.startswith(saved)}


def read_adapter(path: str | Path) -> tuple[AdapterSpec, dict[str, np.ndarray], Path]:
    """(spec, every tensor by its key in the file, the weights file), with the checks users need."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = adapter_folder(path)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.exists():
        raise UserError(f"adapter {folder}: no {WEIGHTS_FILE}")
    with open(weights_path, "rb") as f:
        if f.read(len(LFS_MAGIC)) == LFS_MAGIC:
            raise UserError(f"adapter {weights_path}: a Git LFS pointer, not the weights; run `git lfs pull` in that repository")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"adapter {folder / CONFIG_FILE}: not valid JSON ({e.msg})") from None
    spec = AdapterSpec.from_peft(config, str(folder / CONFIG_FILE))
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"adapter {weights_path}: unreadable safetensors file ({e})") from None
    return spec, tensors, weights_path


def check_modules(adapter_modules, model_modules: dict[str, tuple[int, int]], where: str) -> None:
    """Compare an adapter with a model's linear layers ({path: (out, in)}); name what differs."""
    missing = sorted(set(adapter_modules) - set(model_modules))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"adapter {where} does not fit this base model: it adapts '{missing[0]}'{more}, which the model lacks")
    for module, (a, b, *magnitude) in adapter_modules.items():
        out_dim, in_dim = model_modules[module]
        if a.shape[1] != in_dim or b.shape[0] != out_dim:
            raise UserError(
                f"adapter {where} does not fit this base model: '{module}' is {out_dim}x{in_dim} in the model "
                f"but the adapter is for {b.shape[0]}x{a.shape[1]}"
            )
        if magnitude and magnitude[0].shape != (out_dim,):
            raise UserError(f"adapter {where}: the DoRA magnitude of '{module}' has shape {magnitude[0].shape}, "
                            f"not ({out_dim},) as the layer's outputs")


def check_swappable(adapter_modules, lora_dims: dict[str, tuple[int, int]], where: str, use_dora: bool = False) -> None:
    """An adapter can stand in for the one on a model's LoRA layers ({path: (out, in)}; see
    lora.adapter_swapped) when it adapts only modules that have a LoRA layer there, of their shapes,
    and is DoRA where they are (`use_dora`) and plain LoRA where they are not."""
    extra = sorted(set(adapter_modules) - set(lora_dims))
    if extra:
        raise UserError(f"adapter {where} adapts '{extra[0]}', which the trained adapter does not; train both with the "
                        "same lora.target_modules and lora.layers")
    if any((len(tensors) == 3) != use_dora for tensors in adapter_modules.values()):
        kinds = ("a LoRA", "a DoRA") if use_dora else ("a DoRA", "a LoRA")
        raise UserError(f"adapter {where} is {kinds[0]} adapter and the trained one is {kinds[1]} adapter; train both "
                        "with the same lora.use_dora")
    check_modules(adapter_modules, lora_dims, where)


def layer_index(path: str) -> int:
    """The block a module path belongs to: 'model.layers.3.self_attn.q_proj' -> 3."""
    parts = path.split(".")
    return int(parts[parts.index("layers") + 1])


# lora.target_modules presets: every linear layer of the blocks (PEFT's "all-linear": the LM head is
# outside them), or those of one part of each block, found by the name of the module holding them.
TARGET_PRESETS = {"all-linear": None, "attention": {"self_attn", "attention", "attn"},
                  "mlp": {"mlp", "feed_forward", "ffn"}}


def resolve_targets(target_modules: list[str] | str, modules: dict[str, tuple[int, int]]) -> list[str]:
    """The layer names `lora.target_modules` means on a model whose block linear layers are
    `modules` ({path: (out, in)}): a list as given, or a preset of TARGET_PRESETS resolved to the
    names it covers (PEFT saves all-linear resolved the same way)."""
    if not isinstance(target_modules, str):
        return list(target_modules)
    parents = TARGET_PRESETS[target_modules]
    names = sorted({path.rsplit(".", 1)[-1] for path in modules
                    if parents is None or path.rsplit(".", 2)[-2] in parents})
    if not names:
        raise UserError(f"lora.target_modules={target_modules}: this model has no such linear layers; its blocks hold "
                        f"{', '.join(sorted({p.rsplit('.', 1)[-1] for p in modules}))}")
    return names


def select_modules(modules: dict[str, tuple[int, int]], target_modules: list[str], layers: list[int] | None) -> list[str]:
    """The paths an adapter spec adapts among a model's linear layers ({path: (out, in)}, from a
    backend's linear_modules), in block order; one-line errors name what the model has instead."""
    names = sorted({p.rsplit(".", 1)[-1] for p in modules})
    unknown = [t for t in target_modules if t not in names]
    if unknown:
        raise UserError(f"target module '{unknown[0]}' is not in this model; its linear layers are: {', '.join(names)}")
    n_layers = len({layer_index(p) for p in modules})
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise UserError(f"layer {bad[0]} does not exist; this model has layers 0..{n_layers - 1}")
    chosen = [p for p in modules if p.rsplit(".", 1)[-1] in target_modules and (layers is None or layer_index(p) in layers)]
    return sorted(chosen, key=lambda p: (layer_index(p), p))


def apply_adapter(lora, model, spec: AdapterSpec, weights: dict, where: str) -> None:
    """Put LoRA on `model` as the adapter's config says and load its tensors; `lora` is a backend's
    lora module (linear_modules, apply_lora, set_adapter_weights). A mismatch is a UserError."""
    check_modules(weights, lora.linear_modules(model), where)
    paths = lora.apply_lora(model, spec)
    missing = sorted(set(paths) - set(weights))
    if missing:
        raise UserError(f"adapter {where} lacks weights for '{missing[0]}', which its config targets")
    lora.set_adapter_weights(model, weights)


def attach_adapter(lora, model, path: str | Path, task_type: str | None = "CAUSAL_LM") -> AdapterSpec:
    """The adapter saved at `path`, on `model` (apply_adapter); returns its spec."""
    spec, weights = load_adapter(path, task_type)
    apply_adapter(lora, model, spec, weights, str(path))
    return spec


def save_trained(folder: Path, model, spec: AdapterSpec, config, base_folder, lora, write_model) -> None:
    """What a run saves as its weights: the adapter in PEFT's layout (`lora` is the backend's LoRA
    module), or for full fine-tuning a whole model folder, written by `write_model(staging)`, with
    the base's own config.json, generation config and tokenizer files beside it: transformers 5
    rewrites rope settings in a form that mlx-lm and older transformers do not read, and the
    folder must load on both backends."""
    import shutil

    from mlxft.models.files import TOKENIZER_OUTPUTS

    if not config.lora.full_finetune:
        save_adapter(folder, spec, lora.adapter_weights(model), lora.saved_modules(model, spec))
        return
    with staged_folder(folder) as staging:
        write_model(staging)
        for name in ("config.json", "generation_config.json", *TOKENIZER_OUTPUTS):
            if (Path(base_folder) / name).exists():
                shutil.copy(Path(base_folder) / name, staging / name)
