"""The one text path: a sequence's tokens as text, as they arrive, for every client of the engine
(`Generator.generate` and `.stream`, `generate_batch`, the server).

The text is the tokenizer's own decode (exactly what decoding the finished sequence gives, tokens past the last
whole character decoded together), cut before the first stop string, which may span tokens; what may still
change is held back: an unfinished UTF-8 sequence (decoded as U+FFFD) and a tail that could begin a stop string.
"""

from __future__ import annotations

from typing import Sequence

from .engine import TokenEvent

REPLACEMENT = "\ufffd"  # what the tokenizer decodes an unfinished UTF-8 sequence to


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to hold: an unfinished UTF-8 sequence, or the start of a stop string."""
    hold = 1 if text.endswith(REPLACEMENT) else 0
    for stop in stops:
        tail = text[len(text) - min(len(stop) - 1, len(text)):]
        at = tail.find(stop[0])
        while at >= 0:  # the first place the rest of the text begins the stop string is the longest hold
            if stop.startswith(tail[at:]):
                hold = max(hold, len(tail) - at)
                break
            at = tail.find(stop[0], at + 1)
    return hold


class IncrementalText:
    """One sequence's text as its tokens arrive. `add` returns the text that became final with a token, `finish`
    what was held back once the sequence ends. `finish_reason` is "stop" from the token that completed a stop
    string on, else the engine's reason once `finish` is called. `offsets[i]` is where token i's text starts."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), min_tokens: int = 0):
        """min_tokens: stop strings count only from this many tokens on (vLLM's min_tokens)."""
        self.tokenizer, self.min_tokens = tokenizer, min_tokens
        self.stops = [s for s in stops if s]
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.events: list = []  # the engine's TokenEvents (logprobs)
        self.offsets: list[int] = []
        self.text = ""
        self.settled_ids, self.settled_text = 0, ""  # tokens whose text is final, and that text
        self.sent = 0  # characters handed out
        self.logged = 0  # tokens whose logprobs were handed out
        self.finish_reason: str | None = None

    def add(self, event) -> str:
        """A TokenEvent (or a bare token id). After a stop string, nothing more is added."""
        if self.finish_reason is not None:
            return ""
        token = getattr(event, "token", event)
        self.offsets.append(len(self.text.rstrip(REPLACEMENT)))
        self.ids.append(int(token))
        self.events.append(event)
        # decoded from the last token after which the text was all whole characters: what came before cannot
        # change (byte-level BPE decodes each token to bytes), so each token costs its own text, not the sequence's
        recent = self.tokenizer.decode(self.ids[self.settled_ids:])
        self.text = self.settled_text + recent
        if not recent.endswith(REPLACEMENT):
            self.settled_ids, self.settled_text = len(self.ids), self.text
        if self.stops and len(self.ids) >= self.min_tokens:
            # a stop string cannot start before what was handed out less its length: that text was checked
            start = max(0, self.sent - self.longest_stop)
            cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
                return self._take(len(self.text))
        return self._take(len(self.text) - held_back(self.text, self.stops))

    def take(self, event, request) -> str:
        """An engine event for `request`: a token's final text (a stop string it completes cancels the request,
        whose remaining events then add nothing), or, when the engine ends it, what was held back."""
        if self.finish_reason is not None:
            return ""
        if isinstance(event, TokenEvent):
            piece = self.add(event)
            if self.stopped:
                request.cancel()
            return piece
        return self.finish(event.reason)

    def finish(self, reason: str) -> str:
        """What was held back, once the engine ends the sequence (`reason` is kept unless a stop string came)."""
        self.finish_reason = self.finish_reason or reason
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return piece

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stop"

    def kept_tokens(self) -> int:
        """Tokens that belong to the text: all of them, less those past a stop string's cut."""
        if self.stopped:
            return sum(1 for offset in self.offsets if offset < len(self.text))
        return len(self.ids)

    def take_logprob_tokens(self) -> list[int]:
        """Indexes of the tokens whose text has been handed out (all kept ones once finished), not given yet."""
        upto = self.kept_tokens() if self.finish_reason else sum(1 for o in self.offsets if o < self.sent)
        taken = list(range(self.logged, max(self.logged, upto)))
        self.logged = max(self.logged, upto)
        return taken
