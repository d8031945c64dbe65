"""Chat requests: how a runtime without a chat template renders a SUBMIT's ``messages``.

The broker checks ``messages`` (:func:`inferd.protocol.message_problem`); a
model with a chat template (a HuggingFace checkpoint's) renders them itself;
the torch runtime's other models use :func:`render_plain`, documented in
``docs/protocol.md``.
"""

from __future__ import annotations


def render_plain(messages: list[dict[str, str]]) -> str:
    """The fallback template: one ``role: content`` line per message, then ``assistant:``
    for the model to continue."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
