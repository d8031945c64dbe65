"""An incremental parser for server-sent events (the WHATWG ``text/event-stream`` format).

Pure logic. Bytes arrive in whatever pieces the network makes: an event may be
split across reads, a line too, even a UTF-8 character. So bytes are decoded
incrementally, a partial line is buffered, and an event is dispatched only at
the blank line that ends it. Lines end in LF, CRLF or CR; a CR at the very end
of a read is held back, since an LF may follow in the next one. Comment lines
(``:``) are skipped; ``id`` and ``retry`` mean nothing to a one-shot stream and
are ignored. An event still incomplete when the stream ends is dropped, as the
standard says.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

# A line longer than this is not an event anyone meant to send.
MAX_LINE_CHARS = 1 << 20


class SSEError(Exception):
    """The stream is not valid server-sent events (bad UTF-8, an endless line)."""


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"


class SSEParser:
    def __init__(self, max_line_chars: int = MAX_LINE_CHARS):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._partial = ""      # the start of a line whose end has not arrived
        self._data: list[str] = []
        self._event = ""
        self._max = max_line_chars

    def feed(self, chunk: bytes) -> list[Event]:
        """The events that ``chunk`` completes, in order."""
        try:
            text = self._partial + self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise SSEError(f"the event stream is not valid UTF-8: {exc.reason}") from None
        hold_cr = text.endswith("\r")
        if hold_cr:
            text = text[:-1]
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        self._partial = lines.pop() + ("\r" if hold_cr else "")
        if len(self._partial) > self._max:
            raise SSEError(f"an event stream line exceeds {self._max} characters")
        events: list[Event] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(Event("\n".join(self._data), self._event or "message"))
                self._data.clear()
                self._event = ""
            elif line[0] != ":":
                self._field(line)
        return events

    def _field(self, line: str) -> None:
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        # "id", "retry" and unknown fields: ignored, as the standard says for unknown ones.
