"""Token ids to text for one choice: incremental detokenization and stop strings.

Text is decoded over a sliding window of ids, so each step costs a few tokens of
work, and a character split across tokens is held until it is complete. A stop
string may span tokens: text that could still turn out to start one is held
back while streaming, and the text ends right before the first stop found.
"""

from lightpd.common.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._emitted = 0
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; returns the text that is now safe to show."""
        if self.stopped:
            return ""
        self.ids += token_ids
        self.text += self._decode_new()
        if self.stops:
            position = self._find_stop()
            if position is not None:
                self.text = self.text[:position]
                self.stopped = True
                return self._emit(len(self.text))
            return self._emit(len(self.text) - self._held_back())
        return self._emit(len(self.text))

    def flush(self) -> str:
        """At the end of generation: whatever was held back, an incomplete last
        character included (decoded as the tokenizer would, with U+FFFD)."""
        if not self.stopped:
            self.text += self._decode_new(final=True)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self._emitted : upto]
        self._emitted = max(self._emitted, upto)
        return delta

    def _decode_new(self, final: bool = False) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        after = decode(self.ids[self._prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # an incomplete character: wait for the rest of its bytes
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        return after[len(before) :]

    def _find_stop(self) -> int | None:
        longest = max(map(len, self.stops))
        start = max(0, self._emitted - longest + 1)
        found = [p for p in (self.text.find(s, start) for s in self.stops) if p >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        tail = self.text[self._emitted :]
        for size in range(min(len(tail), max(map(len, self.stops)) - 1), 0, -1):
            if any(stop.startswith(tail[-size:]) for stop in self.stops):
                return size
        return 0
