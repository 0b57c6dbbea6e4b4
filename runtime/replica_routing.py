"""Which replica takes a request (`gptj-tvm serve --replicas`): the request as the ingress hands it to an engine
replica, its affinity keys, and the table of where each key went last. No Ray here: runtime/replica_router.py is
the Ray Serve request router that applies the rule, runtime/replica_ingress.py computes the keys.

The rule. A request whose affinity key the table knows goes to the replica that served that key last, while that
replica has room (fewer requests on it than --max-batch, so it has a free slot and its prefix cache hit is not
paid for with a wait); any other request, and one whose replica is full or gone, goes to the least loaded replica
(fewest requests on it, ties broken at random), which the table then records. Keys:

- chat: one key per conversation, the messages up to and including the first user message. Turn N+1 of a chat
  repeats turn N's messages, so it has turn N's key and goes where turn N went, where the prefix cache holds the
  conversation. Conversations that share only a system prompt are different conversations: they spread.
- completions: the first prompt in blocks of BLOCK_CHARS characters (BLOCK_TOKENS for token ids), a key for each
  whole block prefix, longest first: a prompt goes where the longest prefix it shares with an earlier prompt went.
  A prompt shorter than one block has no key (its prefill is a few tokens).

The table lives in the router, in the ingress's process: with one ingress replica (what build_app deploys) it
sees every request. It forgets the least recently used keys past MAX_KEYS.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

BLOCK_CHARS = 64  # about 16 GPT-2 tokens of English
BLOCK_TOKENS = 16
MAX_BLOCKS = 256  # keys per prompt: prefixes past 16k characters route as their first 16k
MAX_KEYS = 1 << 16
# the routers of this process, by "app/deployment": the ingress asks its engine deployment's router which
# replicas are live (Ray pickles a router's own module by value, so this registry lives here, imported by name)
ROUTERS: dict = {}
ROUTING_METRICS = CollectorRegistry()
ROUTED = Counter("gptj_tvm_routed_requests", "Requests routed, by rule: affinity (to the replica of their key), "
                 "overflow (theirs was full or gone), new (a key not seen), no_key", ["rule"],
                 registry=ROUTING_METRICS)


@dataclass
class ForwardedRequest:
    """An HTTP request as the ingress forwards it to an engine replica, and how to route it: by its affinity keys
    (longest first), or to one replica by id (`pin`: the ingress's calls to every replica)."""

    method: str = "GET"
    path: str = "/"
    query_string: bytes = b""
    headers: list = field(default_factory=list)  # [(name, value)] as bytes, ASGI's way
    body: bytes = b""
    affinity: tuple = ()
    pin: str | None = None


def _digest(hasher) -> str:
    return hasher.hexdigest()[:24]


def chat_key(messages) -> tuple:
    """The conversation's key: its messages through the first user message."""
    if not isinstance(messages, list) or not messages:
        return ()
    first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                      len(messages) - 1)
    head = [[m.get("role"), m.get("content")] if isinstance(m, dict) else m for m in messages[:first_user + 1]]
    text = json.dumps(head, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return ("chat:" + _digest(hashlib.sha256(text.encode("utf-8", "surrogatepass"))),)


def prompt_keys(prompt) -> tuple:
    """A key for each whole block prefix of the first prompt, longest first."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # several prompts: the first decides
    if isinstance(prompt, str):
        kind, size = "text", BLOCK_CHARS
        blocks = [prompt[i:i + size].encode("utf-8", "surrogatepass") for i in range(0, len(prompt), size)]
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        kind, size = "ids", BLOCK_TOKENS
        blocks = [json.dumps(prompt[i:i + size]).encode() for i in range(0, len(prompt), size)]
    else:
        return ()
    whole = len(prompt) // size  # the last block counts only if it is whole
    hasher, keys = hashlib.sha256(kind.encode()), []
    for block in blocks[:min(whole, MAX_BLOCKS)]:  # one pass: each key is the running hash at a block's end
        hasher.update(block)
        keys.append(f"{kind}:{_digest(hasher.copy())}")
    return tuple(reversed(keys))


def affinity_keys(path: str, body) -> tuple:
    """The keys of a request to `path` with JSON `body` (anything: a body the engine will refuse has none)."""
    if not isinstance(body, dict):
        return ()
    if path.rstrip("/") == "/v1/chat/completions":
        return chat_key(body.get("messages"))
    if path.rstrip("/") == "/v1/completions":
        return prompt_keys(body.get("prompt"))
    return ()


class AffinityTable:
    """key -> the replica that served it last, least recently used keys forgotten past max_keys."""

    def __init__(self, max_keys: int = MAX_KEYS):
        self.max_keys = max_keys
        self._replica_of: OrderedDict[str, str] = OrderedDict()

    def lookup(self, keys, live) -> str | None:
        """The replica of the longest key that has one among `live` replica ids."""
        for key in keys:
            replica = self._replica_of.get(key)
            if replica is not None and replica in live:
                self._replica_of.move_to_end(key)
                return replica
        return None

    def record(self, keys, replica: str) -> None:
        for key in keys:
            self._replica_of[key] = replica
            self._replica_of.move_to_end(key)
        while len(self._replica_of) > self.max_keys:
            self._replica_of.popitem(last=False)

    def forget_replica(self, replica: str) -> None:
        for key in [k for k, r in self._replica_of.items() if r == replica]:
            del self._replica_of[key]

    def __len__(self) -> int:
        return len(self._replica_of)
