"""Incremental detokenization with stop strings, for streamed completions.

`TextStream.add(token)` returns the text that can be sent now: the decoded text grows by whole
characters (a token ending inside a UTF-8 character waits for the next), and the last
`len(longest stop) - 1` characters are held back while they could begin a stop string. When a
stop string appears, the text is cut before it and `stopped` is set; `finish()` releases what
was held back. The pieces always concatenate to `text`, the non-streamed answer.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the final text so far (cut at a stop string)
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a generated token; returns newly releasable text ("" while held back)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        full = self.tok.decode(self.ids, skip_special=True)
        if full.endswith("\ufffd"):
            return ""
        cut = self._find_stop(full)
        if cut is not None:
            self.stopped = True
            self.text = full[:cut]
            return self._release(len(self.text))
        self.text = full
        return self._release(len(full) - self.hold)

    def finish(self) -> str:
        """Release the rest (at the end of generation)."""
        return self._release(len(self.text))

    def _find_stop(self, full: str) -> int | None:
        hits = [i for s in self.stop if (i := full.find(s, max(0, self.sent - len(s)))) >= 0]
        return min(hits) if hits else None

    def _release(self, upto: int) -> str:
        upto = min(max(upto, self.sent), len(self.text))
        piece, self.sent = self.text[self.sent : upto], upto
        return piece
