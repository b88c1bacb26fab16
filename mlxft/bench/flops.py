"""Model FLOPs of a training step, the numerator of the bench's "share of peak" column.

How they are counted (the usual 6N convention, written out):
- N_path = the weights of every matrix product a token goes through in the transformer blocks
  (q, k, v, o, gate, up, down in each layer) plus the LoRA factors on them (r x (in + out) each).
  The embedding is a lookup and costs nothing.
- A processed (non-padding) token costs 2 x N_path FLOPs forward and 4 x N_path backward (the
  gradient with respect to the activations and with respect to the weights), 6 x N_path in all.
  With frozen base weights a LoRA step skips most of the weight-gradient half, so it executes
  nearer 4 x N_path: the convention credits 6, as MFU figures usually do, and says so.
- The LM head (vocab x hidden) costs 6 x its weights per position where it runs: only the
  scored positions when the backend splits it off (mlxft does for Llama-like models), every
  position otherwise.
- DPO adds the reference model's forward pass: 2 x N_path per token and 2 x head per head
  position, when the reference is computed in the step (not precomputed).
- Left out: attention's score and value products (12 x layers x T x hidden per token over the
  step, ~7% more for SmolLM-135M's shape at T = 212), norms, activations, the optimizer. So the
  share of peak is a slight underestimate, the same way for every backend.
- Padding is not counted: compute spent on it is waste, and lowers the share.
- DPO with shared prompts runs each prompt once: the tokens counted are those the model ran
  (step records' computed_tokens), not the rows' tokens that tokens/s compares with the peers.
"""

from __future__ import annotations

from mlxft.models.adapters import AdapterSpec

BLOCK_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer of one Llama-style block, from config.json."""
    d, f = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    kv = config.get("num_key_value_heads") or heads
    return {"q_proj": (heads * head_dim, d), "k_proj": (kv * head_dim, d), "v_proj": (kv * head_dim, d),
            "o_proj": (d, heads * head_dim), "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}


def parameter_counts(config: dict, spec: AdapterSpec | None) -> dict[str, int]:
    """{'blocks': N of the block products, 'adapter': LoRA factors, 'head': vocab x hidden}."""
    shapes = module_shapes(config)
    layers = config["num_hidden_layers"]
    blocks = layers * sum(o * i for o, i in shapes.values())
    adapter = 0
    if spec is not None:
        adapted_layers = layers if spec.layers is None else len(spec.layers)
        adapter = adapted_layers * sum(spec.r * (shapes[m][0] + shapes[m][1]) for m in spec.target_modules if m in shapes)
    return {"blocks": blocks, "adapter": adapter, "head": config["vocab_size"] * config["hidden_size"]}


def step_flops(counts: dict, tokens: int, head_positions: int, *, reference_forward: bool = False) -> float:
    """FLOPs of a training step that processed `tokens` non-padding tokens and ran the LM head at
    `head_positions` positions (see the module docstring)."""
    path = counts["blocks"] + counts["adapter"]
    flops = 6.0 * path * tokens + 6.0 * counts["head"] * head_positions
    if reference_forward:
        flops += 2.0 * path * tokens + 2.0 * counts["head"] * head_positions
    return flops
