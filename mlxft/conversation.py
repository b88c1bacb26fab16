"""Turn a conversation (OpenAI-style messages) into the prompt text a model was tuned on.

Templates:
  chat     the tokenizer's chat template, with the whole history
  alpaca   the alpaca-lora texts: the last user message is the instruction, plus an optional
           input; single-turn, since the template has no place for earlier turns
  plain    the last user message as it is (completion-style models); single-turn
  auto     chat when the tokenizer has a chat template, else alpaca

A system prompt goes in as the chat template's system message, and before the prompt as its own
paragraph for the other templates, as the trainers render it. The Alpaca input joins the user
message as a second paragraph under the chat template: the way mlxft renders Alpaca rows there.
Framework-free: no mlx, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxft.data.templates import alpaca_prompt
from mlxft.errors import UserError

TEMPLATES = ("auto", "chat", "alpaca", "plain")
SYSTEM_ROLES = ("system", "developer")  # OpenAI renamed system to developer for newer models


def has_chat_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)  # mlx-lm's tokenizer wrapper knows best
    return bool(flag) if flag is not None else bool(getattr(tokenizer, "chat_template", None))


def resolve_template(template: str, tokenizer) -> str:
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if has_chat_template(tokenizer) else "alpaca"
    if template == "chat" and not has_chat_template(tokenizer):
        raise UserError("this model's tokenizer has no chat template; use --template alpaca or plain")
    return template


def render_messages(messages: list[dict], template: str, tokenizer, input: str = "") -> str:
    """The prompt for messages [{role, content}] under a resolved template (see resolve_template)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] in SYSTEM_ROLES and m["content"])
    if template == "chat":
        chat = [{"role": "system" if m["role"] in SYSTEM_ROLES else m["role"], "content": m["content"]} for m in messages]
        if input:
            last = _last_user_index(chat)
            chat[last] = {"role": "user", "content": f"{chat[last]['content']}\n\n{input}"}
        try:
            return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja's TemplateError and friends: e.g. a template without a system role
            raise UserError(f"the model's chat template cannot render these messages ({type(e).__name__}: {e})".splitlines()[0]) from None
    message = messages[_last_user_index(messages)]["content"]
    if template == "alpaca":
        text = alpaca_prompt(message, input)
    else:
        text = f"{message}\n\n{input}" if input else message
    return f"{system}\n\n{text}" if system else text


def _last_user_index(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return i
    raise UserError("the messages hold no user message to answer")


@dataclass
class Conversation:
    """A chat session: the system prompt and the turns so far; /reset forgets the turns."""

    template: str
    tokenizer: object
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def prompt(self, message: str, input: str = "") -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        return render_messages(messages + [{"role": "user", "content": message}], self.template, self.tokenizer, input)

    def record(self, message: str, answer: str, input: str = "") -> None:
        content = f"{message}\n\n{input}" if input else message
        self.history += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.history.clear()
