"""Streaming detokenization: text deltas out of generated token ids, safe for byte-level BPE and stop strings."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns token ids, pushed a few at a time, into text deltas.

    Invariant: with no stop strings, ``"".join(push(...) results) + finish()`` equals
    ``tokenizer.decode(all_ids, skip_special_tokens=skip_special_tokens)`` however the ids were chunked.
    A delta never ends inside a multi-byte character (only the ``finish()`` flush may end in U+FFFD).
    With stop strings, the emitted text is that decode cut before the earliest stop string, and no delta
    ever contains any part of a stop string.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, stop: tuple[str, ...] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(stop)
        # A stop string may begin in the last (longest - 1) characters; they stay back until disproved.
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        # ids[prefix_offset:read_offset] were already emitted; decoding them again with the new ids gives the
        # new ids the context they need (a character split across tokens) at O(window) cost.
        self._prefix_offset = 0
        self._read_offset = 0
        self._pending = ""  # decoded, but held back because it may be the start of a stop string
        self._text = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """A stop string appeared in the text; later pushes return ""."""
        return self._stopped

    @property
    def text(self) -> str:
        """All text emitted so far (the sum of the returned deltas)."""
        return self._text

    def push(self, token_ids: list[int]) -> str:
        """Append newly generated tokens; return the text delta that is now safe to emit."""
        if self._stopped:
            return ""
        self._ids.extend(token_ids)
        return self._release(self._decode_new(final=False), final=False)

    def finish(self) -> str:
        """The request ended: return whatever text was held back (never a stop string or text after it)."""
        if self._stopped:
            return ""
        return self._release(self._decode_new(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_new(self, final: bool) -> str:
        """Text of the ids past read_offset, or "" while it still ends in an incomplete character."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # A trailing U+FFFD is usually a character whose remaining bytes are in tokens not generated yet;
        # only at the end of the request is it the honest decode.
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def _release(self, delta: str, final: bool) -> str:
        """Move decoded text through the stop-string check; return the part that may be emitted now."""
        pending = self._pending + delta
        # Older text was searched while its last `holdback` chars were still pending, so a stop string
        # can only start inside `pending`.
        cut = self._first_stop(pending)
        if cut is not None:
            self._stopped = True
            out, self._pending = pending[:cut], ""
        else:
            keep = 0 if final else min(self._holdback, len(pending))
            out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._text += out
        return out

    def _first_stop(self, text: str) -> int | None:
        """Earliest position of any stop string in text, or None."""
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None
