"""What `gptj-tvm serve` is asked for (its flags) and their defaults, in one place for the CLI, the server and the
tests. Imports nothing of TVM, so the CLI reads its defaults before it loads TVM's library."""

from __future__ import annotations

import dataclasses

DEFAULT_PREFILL_CHUNK = 32  # prompt tokens per step beside the decode rows: at most a few decode steps long


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 8  # sequences decoded together, each with a KV-cache slot
    max_queue: int = 64  # requests waiting for a slot before 429
    kv_cache_gb: float | None = None  # None: every slot holds the whole context
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens per step beside the decode rows
    prefix_cache: bool = True  # slots keep their rows for later prompts with the same beginning
    api_key: str | None = None
    model_name: str | None = None  # None: the artifact folder's name
    max_tokens_limit: int | None = None  # None: a slot's positions
    max_n: int = 16
    max_body_bytes: int = 1 << 20
    drain_seconds: float = 30.0  # on SIGTERM, for what is running and queued to finish
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers
    verify: bool = False  # check the weights' sha256 at load


DEFAULTS = ServeOptions()


@dataclasses.dataclass(frozen=True)
class ReplicaOptions:
    """`gptj-tvm serve --replicas`: how many engines, where, and how requests reach them (runtime/replicas.py)."""

    replicas: int = 1  # engines at the start (and always, without autoscaling)
    ray_address: str | None = None  # None: a Ray head on this machine, bound to 127.0.0.1
    min_replicas: int | None = None  # with max_replicas: autoscale on requests per replica between the two
    max_replicas: int | None = None
    replica_cpus: float | None = None  # None: the cluster's CPUs shared among the most replicas there can be
    prefix_routing: bool = True  # a conversation's next turn to the replica that holds it (replica_routing.py)

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def most(self) -> int:
        return max(self.replicas, self.max_replicas or 0)
