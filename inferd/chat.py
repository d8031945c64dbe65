"""Chat requests: a SUBMIT's ``messages``, checked by the broker and rendered by runtimes without a template.

Pure logic, imported by the broker (validation) and by workers (rendering).
A model with a chat template (a HuggingFace checkpoint's) renders the
messages itself; every other runtime uses :func:`render_plain`, documented in
``docs/protocol.md``.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 1024


def problem(messages: Any) -> str | None:
    """What is wrong with a SUBMIT's ``messages``, or None."""
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        return f"must be a list of 1 to {MAX_MESSAGES} messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            return f"[{i}] must be a map with exactly the keys role and content"
        if message["role"] not in ROLES:
            return f"[{i}].role must be one of {', '.join(ROLES)}"
        if not isinstance(message["content"], str):
            return f"[{i}].content must be a string"
    return None


def render_plain(messages: list[dict[str, str]]) -> str:
    """The fallback template: one ``role: content`` line per message, then ``assistant:``
    for the model to continue."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
