"""The certificate of a GGUF export: what llama.cpp itself does with the file, against mlxft.

1. Tokens. Probe texts (digits, contractions, runs of spaces, tabs, newlines, CRLF, non-Latin scripts,
   emoji, the chat template's special tokens) tokenize in llama.cpp to the Hugging Face tokenizer's
   ids, and llama.cpp adds BOS exactly when the tokenizer does. One difference is reported, not
   failed: a sentencepiece text that starts with a space (llama.cpp cannot be told to leave it).
2. Greedy answers. Prompts rendered through the chat template get llama.cpp's greedy continuation
   and mlxft's (MLX, float32, with the adapter when there is one), token for token. A divergence at
   a position where mlxft's two candidates are within the type's tie bound of each other is a near
   tie, reported as such; any other divergence fails f32 and f16. Lower types report agreement.
3. Logits. llama.cpp's logits on the first prompt against mlxft's, relative to the largest.

`certify` returns the certificate as a dict; the caller decides what a failure costs (mlxft.models.export
deletes the file). Raises UserError when llama.cpp is not installed (mlxft.models.gguf.runtime).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxft.models.gguf.vocab import SPLIT_PROBES
from mlxft.train.saved_check import relative_difference

PROMPTS = (
    "What is the capital of France?",
    "What's 1234 + 5678? Don't explain.",
    "Give three tips for staying healthy.",
    "I can't remember: is 2,048 a power of two?",
)
MAX_TOKENS = 24
# Largest |llama.cpp - mlxft| logit over the largest |mlxft| logit that an exact type may show, and
# the gap between two candidates (same scale) under which a different greedy pick is a near tie.
# Measured on SmolLM2-135M-Instruct and the built-in model (benchmarks/RESULTS.md). q8_0 is not
# exact, but its near ties are reported at its own logit error (the export check's bound, 6e-2):
# a pick that flips inside it says nothing about the file.
LOGIT_BOUND = {"f32": 2.5e-3, "f16": 6e-3}
TIE_BOUND = {"f32": 2.5e-3, "f16": 6e-3, "q8_0": 6e-2}
EXACT = tuple(LOGIT_BOUND)


def chat_texts(tokenizer) -> list[str]:
    """The chat template rendered around short turns: its special tokens, as a prompt has them."""
    if not tokenizer.chat_template:
        return []
    turns = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello. How can I help?"},
             {"role": "user", "content": "Count: 1, 22, 333."}]
    texts = [tokenizer.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True),
             tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)]
    try:
        texts.append(tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *turns[:1]],
                                                   tokenize=False, add_generation_prompt=True))
    except Exception:  # a template that refuses system messages (Gemma's older ones)
        pass
    return texts


def prompt_ids(tokenizer, question: str) -> list[int]:
    from mlxft.data.encode import encode_prompt

    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    else:
        text = question
    return encode_prompt(tokenizer, text)


def stop_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()


def mlxft_greedy(model, ids: list[int], max_tokens: int, stop: set[int]) -> tuple[list[int], np.ndarray]:
    """mlxft's greedy answer (the sampler `mlxft generate` uses at temperature 0) and the logits
    of the whole sequence at the answer's positions."""
    import mlx.core as mx

    from mlxft.backends.mlx.generate import sample_completions

    answer = sample_completions(model, ids, 1, max_tokens=max_tokens, temperature=0.0, stop=stop)[0]
    logits = model(mx.array(ids + answer)[None])[0, len(ids) - 1: len(ids) - 1 + len(answer)].astype(mx.float32)
    return answer, np.array(logits)


def compare_answers(ours: list[int], theirs: list[int], our_logits: np.ndarray, tie: float | None) -> dict:
    same = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    result = {"tokens": len(ours), "agreeing_tokens": same, "equal": ours == theirs}
    if not result["equal"] and same < len(ours) and same < len(theirs):
        row = our_logits[same]
        gap = float(row[ours[same]] - row[theirs[same]]) / (float(np.abs(row).max()) or 1.0)
        result["gap_at_divergence"] = gap
        result["near_tie"] = tie is not None and gap <= tie
    return result


def certify(gguf_file: str | Path, folder: str | Path, kind: str, *, lora_file: str | Path | None = None,
            adapter: str | Path | None = None, prompts=PROMPTS, max_tokens: int = MAX_TOKENS) -> dict:
    """Run `gguf_file` (with `lora_file` on it) in llama.cpp and check it against `folder` (with
    `adapter`) in mlxft; see the module's docstring."""
    from transformers import AutoTokenizer

    from mlxft.backends.mlx import lora
    from mlxft.backends.mlx.model import load
    from mlxft.models.gguf.runtime import Runtime, version

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    runtime = Runtime(gguf_file, lora=lora_file)
    try:
        texts = [*SPLIT_PROBES, *chat_texts(tokenizer)]
        token_mismatches = [text for text in texts
                            if runtime.tokenize(text, add_special=False) != tokenizer.encode(text, add_special_tokens=False)]
        # llama.cpp's sentencepiece always puts its space marker before a text's first word, where
        # transformers' Metaspace ("first") leaves a text that starts with a space as it is. No GGUF
        # key says otherwise, and no chat template starts a prompt with a space: reported, not failed.
        sentencepiece = (Path(folder) / "tokenizer.model").exists()
        leading_space = [text for text in token_mismatches if sentencepiece and text[:1].isspace()]
        token_mismatches = [text for text in token_mismatches if text not in leading_space]
        hf_bos = tokenizer.encode("a")[:1] == [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else False
        ours_bos = runtime.tokenize("a")[:1] == [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else False

        model, _, _ = load(str(folder))
        if adapter is not None:
            from mlxft.models.adapters import attach_adapter

            attach_adapter(lora, model, adapter)
        model.eval()
        stop = stop_ids(tokenizer)
        answers, logit_difference = [], None
        for question in prompts:
            ids = prompt_ids(tokenizer, question)
            ours, our_logits = mlxft_greedy(model, ids, max_tokens, stop)
            theirs, _ = runtime.greedy(ids, max_tokens, stop)
            if logit_difference is None:
                import mlx.core as mx

                reference = np.array(model(mx.array(ids)[None])[0].astype(mx.float32))
                logit_difference = relative_difference(runtime.logits(ids), reference)
            answers.append({"prompt": question, **compare_answers(ours, theirs, our_logits, TIE_BOUND.get(kind)),
                            "mlxft": tokenizer.decode(ours, skip_special_tokens=True),
                            "llama_cpp": tokenizer.decode(theirs, skip_special_tokens=True)})
    finally:
        runtime.close()
    agreeing = sum(a["agreeing_tokens"] for a in answers)
    total = sum(a["tokens"] for a in answers)
    failures = []
    if token_mismatches:
        failures.append(f"{len(token_mismatches)} of {len(texts)} probe texts tokenize differently in llama.cpp "
                        f"(first: {token_mismatches[0]!r})")
    if hf_bos != ours_bos:
        failures.append(f"llama.cpp {'adds' if ours_bos else 'does not add'} BOS where the tokenizer "
                        f"{'does not' if ours_bos else 'does'}")
    if kind in EXACT:
        if logit_difference > LOGIT_BOUND[kind]:
            failures.append(f"llama.cpp's logits differ from mlxft's by {logit_difference:.2e} of the largest "
                            f"(allowed for {kind}: {LOGIT_BOUND[kind]:g})")
        for a in answers:
            if not a["equal"] and not a.get("near_tie"):
                failures.append(f"llama.cpp's greedy answer to {a['prompt']!r} leaves mlxft's after {a['agreeing_tokens']} "
                                f"tokens: {a['llama_cpp']!r} instead of {a['mlxft']!r}")
    return {
        "file": str(gguf_file), "lora": str(lora_file) if lora_file else None, "type": kind,
        "runtime": f"llama.cpp via llama-cpp-python {version()}",
        "tokenizer": {"probes": len(texts), "mismatches": token_mismatches, "leading_space_differences": leading_space,
                      "adds_bos": ours_bos, "hf_adds_bos": hf_bos},
        "logits": {"max_relative_difference": logit_difference, "bound": LOGIT_BOUND.get(kind)},
        "greedy": {"prompts": len(answers), "equal": sum(a["equal"] for a in answers),
                   "near_ties": sum(bool(a.get("near_tie")) for a in answers),
                   "token_agreement": agreeing / total if total else 1.0,
                   # the same, an answer left at a near tie counted as agreeing: what the file decides
                   "token_agreement_beyond_ties": (sum(a["tokens"] if a.get("near_tie") else a["agreeing_tokens"]
                                                       for a in answers) / total) if total else 1.0,
                   "answers": answers},
        "passed": not failures, "failures": failures,
    }


def describe(certificate: dict) -> list[str]:
    tokens, greedy, logits = certificate["tokenizer"], certificate["greedy"], certificate["logits"]
    lines = [f"certified in {certificate['runtime']}: " + ("passed" if certificate["passed"] else "FAILED"),
             f"  tokens: {tokens['probes'] - len(tokens['mismatches']) - len(tokens['leading_space_differences'])} of "
             f"{tokens['probes']} probe texts as transformers tokenizes them"
             + (f" ({len(tokens['leading_space_differences'])} starting with a space differ: llama.cpp's sentencepiece always "
                "marks a first word)" if tokens["leading_space_differences"] else "")
             + f"; BOS {'added' if tokens['adds_bos'] else 'not added'}, as the tokenizer does"
             + ("" if tokens["adds_bos"] == tokens["hf_adds_bos"] else " NOT"),
             f"  greedy: {greedy['equal']} of {greedy['prompts']} answers equal to mlxft's token for token"
             + (f" ({greedy['near_ties']} left it at a near tie)" if greedy["near_ties"] else "")
             + f"; {greedy['token_agreement']:.0%} of tokens before any divergence",
             f"  logits: {logits['max_relative_difference']:.1e} of the largest from mlxft's"
             + (f" (allowed {logits['bound']:g})" if logits["bound"] else "")]
    lines += [f"  failed: {failure}" for failure in certificate["failures"]]
    return lines
