"""Chat templates: messages to prompt token ids, with a pinned-system-prompt slot.

A template is two strings from the version's config, not code (no Jinja): ``message`` is rendered
once per message with ``{role}`` and ``{content}`` replaced, and ``generation_prompt`` is appended
to open the assistant's turn. Only those two placeholders exist; nothing else in the string is
interpreted.

The template's own text is encoded with its special tokens matched (``<|user|>`` is one token);
a message's content is encoded as plain text, so a client who writes ``<|assistant|>`` in a
message gets the characters, never the token.

When the config pins a system prompt, it is always the first message, and a client's own
``system`` messages are rendered with the ``user`` role: they reach the model, but without the
system role's authority.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bastion.errors import InvalidInput
from bastion.text.tokenizer import TextTokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    message: str = "<|{role}|>\n{content}<|end|>\n"
    generation_prompt: str = "<|assistant|>\n"
    pinned_system: str | None = None

    def __post_init__(self) -> None:
        if self.message.count("{content}") != 1:
            raise ValueError("a chat template's message must hold {content} exactly once")

    @classmethod
    def from_dict(cls, found: Mapping[str, Any]) -> ChatTemplate:
        unknown = set(found) - {"message", "generation_prompt", "pinned_system"}
        if unknown:
            raise ValueError(f"unknown chat template fields: {sorted(unknown)}")
        for name in ("message", "generation_prompt"):
            if name in found and not isinstance(found[name], str):
                raise ValueError(f"chat template {name} must be a string")
        pinned = found.get("pinned_system")
        if pinned is not None and not isinstance(pinned, str):
            raise ValueError("chat template pinned_system must be a string or null")
        return cls(**found)

    def to_dict(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "generation_prompt": self.generation_prompt,
            "pinned_system": self.pinned_system,
        }

    def messages(self, messages: Sequence[Message]) -> list[Message]:
        """The messages as the model sees them: the pinned system prompt first, roles checked."""
        out: list[Message] = []
        if self.pinned_system is not None:
            out.append(Message("system", self.pinned_system))
        for m in messages:
            if m.role not in ROLES:
                raise InvalidInput(f"unknown message role {m.role!r}; expected one of {list(ROLES)}")
            role = "user" if m.role == "system" and self.pinned_system is not None else m.role
            out.append(Message(role, m.content))
        return out

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt as text (for logs and tests; the model gets ``encode``'s ids)."""
        return "".join(before + m.content + after for m, (before, after) in self._parts(messages)) + (
            self.generation_prompt
        )

    def encode(self, tokenizer: TextTokenizer, messages: Sequence[Message]) -> list[int]:
        """Prompt token ids: template text with special tokens matched, content as plain text."""
        ids: list[int] = []
        if tokenizer.bos_id is not None:
            ids.append(tokenizer.bos_id)
        for m, (before, after) in self._parts(messages):
            ids += tokenizer.encode(before, split_special=True)
            ids += tokenizer.encode(m.content)
            ids += tokenizer.encode(after, split_special=True)
        ids += tokenizer.encode(self.generation_prompt, split_special=True)
        return ids

    def _parts(self, messages: Sequence[Message]) -> list[tuple[Message, tuple[str, str]]]:
        before, after = self.message.split("{content}")
        return [
            (m, (before.replace("{role}", m.role), after.replace("{role}", m.role))) for m in self.messages(messages)
        ]
