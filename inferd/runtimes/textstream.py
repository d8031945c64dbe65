"""Turning generated tokens into streamed text: incremental UTF-8 and stop strings.

Pure logic (no torch), shared by every token-generating runtime. A token may
end in the middle of a UTF-8 character, so bytes are decoded incrementally;
a stop string may arrive split across tokens, so text that could still be
the start of a stop string is held back until it cannot. The stop string
itself is never streamed, as in vLLM and the OpenAI API.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: tuple[str, ...] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._longest = max((len(s) for s in stop), default=0)
        self._text = ""       # decoded so far
        self._sent = 0        # how much of it has been released
        self.stopped = False  # a stop string was found: nothing more will be released

    def push(self, data: bytes) -> str:
        """Add a token's bytes; the text that may be streamed now ("" if none)."""
        if self.stopped:
            return ""
        self._text += self._decoder.decode(data)
        if not self._stop:
            return self._release(len(self._text))
        # Search only where a stop string could newly end.
        start = max(0, self._sent - self._longest)
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        return self._release(len(self._text) - self._held_back())

    def finish(self) -> str:
        """The end of the sequence: whatever was held back, and any partial character."""
        if self.stopped:
            return ""
        self._text += self._decoder.decode(b"", final=True)
        return self._release(len(self._text))

    def _held_back(self) -> int:
        """The longest tail of the text that is a proper prefix of a stop string."""
        for size in range(min(self._longest - 1, len(self._text) - self._sent), 0, -1):
            tail = self._text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self._sent)
        out = self._text[self._sent:end]
        self._sent = end
        return out
