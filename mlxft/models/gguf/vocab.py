"""The tokenizer as llama.cpp describes it in a GGUF file, with its pre-tokenizer named by what it does.

llama.cpp tokenizes byte-level BPE in two steps: it splits the text with the regular expressions of
a named pre-tokenizer (`tokenizer.ggml.pre`), then merges bytes within each piece. A file that names
the wrong one (or `default`) tokenizes contractions, digit runs, space runs and non-Latin scripts
unlike the model was trained. llama.cpp's own converter recognises a tokenizer by hashing its output
on a fixed text; here the same idea is made explicit. Each llama.cpp family's expressions are
applied as llama.cpp applies them (each one splits every piece the previous one left; matches and
the text between them are both kept), each piece is merged by the tokenizer's own BPE, and the ids
are compared with the Hugging Face tokenizer's on probe texts. Of the families that give the same
ids on every probe, with the same merge rule and the same clean-up of spaces when decoding, the one
that also cuts the same pieces is preferred. No match is a UserError naming the tokenizer's
pre-tokenizer, never a silent `default`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlxft.errors import UserError

# llama.cpp's expressions, as src/llama-vocab.cpp spells them for each family (facts of its format).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
          r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Family:
    name: str  # tokenizer.ggml.pre
    expressions: tuple[str, ...]
    ignore_merges: bool = False  # llama.cpp takes a whole piece that is in the vocabulary as one token
    clean_spaces: bool | None = None  # None: either; else it must equal clean_up_tokenization_spaces


# In order of preference where two split alike.
FAMILIES = (
    Family("llama-bpe", (LLAMA3,), ignore_merges=True),
    Family("qwen2", (QWEN2,)),
    Family("qwen35", (QWEN35,)),
    Family("smollm", (r"\p{N}", GPT2), clean_spaces=False),
    Family("starcoder", (r"\p{N}", GPT2), clean_spaces=True),
    Family("gpt-2", (GPT2,), clean_spaces=True),
)

# Texts that tell the families apart: contractions in both cases, digit runs of every length,
# runs of spaces, tabs and newlines, CRLF, punctuation runs, non-Latin scripts, combining marks, emoji.
SPLIT_PROBES = (
    "Hello world! I can't, you're, we've, they'll, she'd, I'm. CAN'T DON'T WE'LL",
    "1 22 333 4444 55555 1234567 3.14159 1,000,000 2026-12-07",
    "a  b   c    d\te\t\tf\ng\n\nh\r\ni \n j",
    "   leading and trailing   ",
    "!!! ??? ... --- ((x)) {y} [z] <a> #tag @who $5 %7 ^&*",
    "日本語のテキスト 中文 한국어 Привет мир مرحبا हिन्दी ภาษาไทย",
    "naïve café résumé Zürich e\u0301 \u0915\u093f",
    "emoji 🦙🔥 👍🏽 👨‍👩‍👧 ✅",
    "def f(x):\n    return x**2  # comment\n",
)


def pieces(expressions: tuple[str, ...], text: str) -> list[tuple[int, int]]:
    """The spans llama.cpp's pre-tokenizer cuts `text` into."""
    import regex

    spans = [(0, len(text))]
    for expression in expressions:
        pattern, cut = regex.compile(expression), []
        for start, end in spans:
            at = start
            for match in pattern.finditer(text, start, end):
                if match.start() > at:
                    cut.append((at, match.start()))
                if match.end() > match.start():
                    cut.append((match.start(), match.end()))
                at = match.end()
            if at < end:
                cut.append((at, end))
        spans = cut
    return spans


def hf_pieces(tokenizer, text: str) -> list[tuple[int, int]]:
    """The spans the Hugging Face tokenizer's own pre-tokenizer cuts `text` into."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    return [tuple(offsets) for _, offsets in pre.pre_tokenize_str(text)]


def byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def family_ids(tokenizer, family: Family, text: str, alphabet: dict[int, str]) -> list[int]:
    """The ids llama.cpp would give `text` under `family`: its pieces, each merged by this BPE."""
    model = tokenizer.backend_tokenizer.model
    return [token.id for start, end in pieces(family.expressions, text)
            for token in model.tokenize("".join(alphabet[b] for b in text[start:end].encode()))]


def pre_tokenizer(tokenizer, state: dict, where: str) -> str:
    """The llama.cpp family that tokenizes as this tokenizer does (see the module's docstring)."""
    described = json.dumps(state.get("pre_tokenizer"))
    if '"ByteLevel"' not in described:
        raise UserError(f"model {where}: its BPE tokenizer is not byte-level ({described[:160]}); llama.cpp has no family for it here")
    ignore_merges = bool(state.get("model", {}).get("ignore_merges", False))
    clean = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    alphabet = byte_alphabet()
    want = [tokenizer.encode(text, add_special_tokens=False) for text in SPLIT_PROBES]
    alike = [family for family in FAMILIES
             if family.ignore_merges == ignore_merges and family.clean_spaces in (None, clean)
             and all(family_ids(tokenizer, family, text, alphabet) == ids for text, ids in zip(SPLIT_PROBES, want))]
    for family in alike:
        if all(pieces(family.expressions, text) == hf_pieces(tokenizer, text) for text in SPLIT_PROBES):
            return family.name
    if alike:
        return alike[0].name
    raise UserError(f"model {where}: its tokenizer splits text as none of llama.cpp's pre-tokenizers that mlxft "
                    f"knows ({', '.join(f.name for f in FAMILIES)}), so llama.cpp would tokenize it differently; "
                    f"its pre-tokenizer is {described[:160]}")


# llama.cpp's token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def add_tokenizer(writer, folder: Path, config: dict) -> dict:
    """The tokenizer in the writer's metadata: a sentencepiece model ('llama': pieces, scores,
    types) or a byte-level BPE ('gpt2': tokens, types, merges and the pre-tokenizer family), with
    the special ids and the chat template. Returns what was chosen."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    chosen = {}
    if (folder / "tokenizer.model").exists():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        size = sp.get_piece_size()
        writer.add_tokenizer_model("llama")  # no pre-tokenizer: sentencepiece splits nothing first
        writer.add_token_list([sp.id_to_piece(i) for i in range(size)])
        writer.add_token_scores([sp.get_score(i) for i in range(size)])
        writer.add_token_types([UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                                else UNUSED if sp.is_unused(i) else NORMAL for i in range(size)])
        chosen["model"] = "llama"
    else:
        state = json.loads((folder / "tokenizer.json").read_text())
        model = state.get("model", {})
        if model.get("type") != "BPE":
            raise UserError(f"model {folder}: its tokenizer ({model.get('type')}) has no GGUF form here yet")
        pre = pre_tokenizer(tokenizer, state, str(folder))
        vocab = tokenizer.get_vocab()
        tokens = [None] * max(len(vocab), config["vocab_size"])
        for token, i in vocab.items():
            tokens[i] = token
        added = {t["content"]: t.get("special", False) for t in state.get("added_tokens", [])}
        # llama.cpp matches added tokens before it splits: special ones as control tokens, the
        # others as user-defined; a normal token is only ever reached by merging.
        types = [UNUSED if t is None else (CONTROL if added[t] else USER_DEFINED) if t in added else NORMAL for t in tokens]
        tokens = [f"[PAD{i}]" if t is None else t for i, t in enumerate(tokens)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        chosen.update(model="gpt2", pre=pre)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    # Whether encoding adds BOS lives in a post-processor in transformers 5: ask the tokenizer.
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer.encode("a")[:1] == [bos])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return chosen
