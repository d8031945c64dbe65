"""A byte-level tokenizer: every UTF-8 byte is a token, plus start and end of sequence.

No vocabulary file to ship or download, and any text round-trips.
"""

from __future__ import annotations

BOS = 256
EOS = 257
VOCAB_SIZE = 258


class ByteTokenizer:
    eos_id = EOS

    def encode(self, text: str) -> list[int]:
        return [BOS, *text.encode("utf-8")]

    def token_bytes(self, token: int) -> bytes:
        return bytes((token,)) if 0 <= token < 256 else b""
