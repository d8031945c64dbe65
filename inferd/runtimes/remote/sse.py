"""An incremental parser for server-sent events (the WHATWG ``text/event-stream`` format).

Pure logic. Bytes arrive in whatever pieces the network makes: an event may be
split across reads, a line too, even a UTF-8 character. So the parser works on
bytes: it splits lines on the ASCII line ends, which never occur inside a UTF-8
sequence, buffers a partial line, and decodes an event's data only once the
blank line that ends it has arrived. That is also the cheap way: a worker
parses one event per token, so a read costs a ``find`` or two and a slice, not
an incremental decode and a split of every line.

Lines end in LF, CRLF or CR; a CR at the very end of a read is held back, since
an LF may follow in the next one. Comment lines (``:``) are skipped; ``id`` and
``retry`` mean nothing to a one-shot stream and are ignored. An event still
incomplete when the stream ends is dropped, as the standard says.
"""

from __future__ import annotations

from typing import NamedTuple

# A line longer than this is not an event anyone meant to send.
MAX_LINE_BYTES = 1 << 20


class SSEError(Exception):
    """The stream is not valid server-sent events (bad UTF-8, an endless line)."""


class Event(NamedTuple):  # a tuple: one per token, built at half a frozen dataclass's cost
    data: str
    event: str = "message"


class SSEParser:
    __slots__ = ("_buf", "_data", "_event", "_max")

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES):
        self._buf = b""                 # the start of a line whose end has not arrived
        self._data: list[bytes] = []    # the data lines of the event being read
        self._event = b""
        self._max = max_line_bytes

    def feed(self, chunk: bytes) -> list[Event]:
        """The events that ``chunk`` completes, in order."""
        buf = self._buf + chunk if self._buf else chunk
        tail = b""
        if b"\r" in buf:
            if buf[-1] == 13:  # b"\r": maybe the first half of a CRLF
                buf, tail = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[Event] = []
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if end == start:
                if self._data:
                    events.append(self._dispatch())
            elif buf[start] != 58:  # b":": a comment
                self._field(buf[start:end])
            start = end + 1
        self._buf = buf[start:] + tail if start or tail else buf
        if len(self._buf) > self._max:
            raise SSEError(f"an event stream line exceeds {self._max} bytes")
        return events

    def _field(self, line: bytes) -> None:
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value
        # "id", "retry" and unknown fields: ignored, as the standard says for unknown ones.

    def _dispatch(self) -> Event:
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        event, self._event = self._event, b""
        try:
            return Event(data.decode(), event.decode() if event else "message")
        except UnicodeDecodeError as exc:
            raise SSEError(f"the event stream is not valid UTF-8: {exc.reason}") from None
