"""The Modelfile's TEMPLATE renders, in Go's text/template (what Ollama runs), exactly what the
chat template renders in transformers: one to three turns, with and without a system message,
the template's own default system prompt included. Needs Go (Debian's golang-go; .ci/run installs it)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
GO = shutil.which("go")
pytestmark = pytest.mark.skipif(GO is None, reason="Go is not installed (apt-get install golang-go)")

from mlxft.models.ollama import go_template  # noqa: E402

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content']"
          " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
TURNS = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
         {"role": "user", "content": "And times 3?\nShow it."}, {"role": "assistant", "content": "12, since 4 x 3 = 12."},
         {"role": "user", "content": "Thanks!"}]
CHATS = [TURNS[:n] for n in (1, 3, 5)]
CHATS += [[{"role": "system", "content": "Answer in one line."}, *chat] for chat in CHATS]


def go_render(template: str, messages: list[dict]) -> str:
    program = Path(__file__).parent / "go_template" / "render.go"
    result = subprocess.run([GO, "run", str(program)], input=json.dumps({"template": template, "messages": messages}),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def tokenizer_with(tiny_model_dir, chat_template):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.mark.parametrize("name, chat_template", [("smollm2", SMOLLM2), ("chatml", CHATML), ("llama3", LLAMA3), ("builtin", None)])
def test_the_go_template_renders_what_the_chat_template_renders(tiny_model_dir, name, chat_template):
    tokenizer = tokenizer_with(tiny_model_dir, chat_template)
    template, _ = go_template(tokenizer)
    for chat in CHATS:
        expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if name == "llama3":  # BOS: llama.cpp adds it when it tokenizes, as the GGUF says
            expected = expected.removeprefix(tokenizer.bos_token)
        assert go_render(template, chat) == expected, (name, chat)


def test_the_default_system_prompt_is_what_differs(tiny_model_dir):
    # The negative control: SmolLM2's TEMPLATE without its default renders otherwise when no system is given.
    tokenizer = tokenizer_with(tiny_model_dir, SMOLLM2)
    template, _ = go_template(tokenizer)
    bare, _ = go_template(tokenizer_with(tiny_model_dir, CHATML))
    assert "named SmolLM" in go_render(template, TURNS[:1]) and "named SmolLM" not in go_render(bare, TURNS[:1])
