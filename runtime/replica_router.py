"""The Ray Serve request router of the engine deployment: runtime/replica_routing.py's rule (the module doc says
it in words). It runs where the engine's handle is used, in the ingress's process, and sees each call's
ForwardedRequest as its first argument.

Ray pickles this module by value into that process, so whatever must be shared with the ingress (the registry of
routers, the counters) is reached through `routing`, a module imported by name.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from gptj_tvm.runtime import replica_routing as routing


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, room: int = 8, affinity: bool = True, **_):
        """room: requests a replica may hold and still take a conversation's next turn (the engine's
        --max-batch); affinity False: every request to the least loaded replica."""
        self.room, self.affinity = room, affinity
        self.table = routing.AffinityTable()
        # requests this router has on each replica, which it counts itself: Ray's queue-length cache forgets an
        # entry after seconds and prefers a cached replica to one it would have to ask. A request counts from
        # the moment it is ranked (reserved on its first choice), so requests arriving together spread.
        self.held: dict[str, int] = {}
        self.reserved: dict[int, tuple[PendingRequest, str]] = {}
        self.counted: dict[tuple, int] = {}  # (request id, replica) -> calls: a retry may reuse both
        routing.ROUTERS[self.app_name] = self

    def live_ids(self) -> dict[str, RunningReplica]:
        return {replica_id.unique_id: replica for replica_id, replica in self.curr_replicas.items()}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of one replica each, best first: Ray takes the first whose queue is not full."""
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # the ranks hold every replica there is
        pin = getattr(request, "pin", None)
        if pin is not None:  # a call for one replica waits for that one (the caller bounds the wait)
            return [[r for r in candidate_replicas if r.replica_id.unique_id == pin]]
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))  # ties at random
        ranks = [[r] for r in sorted(shuffled, key=lambda r: self.held.get(r.replica_id.unique_id, 0))]
        keys = getattr(request, "affinity", ()) if self.affinity else ()
        last = self.table.lookup(keys, {r.replica_id.unique_id for r in candidate_replicas}) if keys else None
        if last is not None and self.held.get(last, 0) < self.room:
            ranks.sort(key=lambda rank: rank[0].replica_id.unique_id != last)  # stable: the rest stay in order
        if pending_request is not None and ranks:
            self._reserve(pending_request, ranks[0][0].replica_id.unique_id)
        return ranks

    def _reserve(self, pending_request: PendingRequest, replica: str) -> None:
        self._release(pending_request)
        for waiting, _ in [entry for entry in self.reserved.values() if entry[0].future.cancelled()]:
            self._release(waiting)  # its caller gave up before it was routed
        self.reserved[id(pending_request)] = (pending_request, replica)
        self.held[replica] = self.held.get(replica, 0) + 1

    def _release(self, pending_request: PendingRequest) -> None:
        _, replica = self.reserved.pop(id(pending_request), (None, None))
        if replica in self.held:
            self.held[replica] -= 1

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        request = pending_request.args[0] if pending_request.args else None
        if getattr(request, "pin", None) is not None:
            return
        chosen = replica_id.unique_id
        self._release(pending_request)
        self.held[chosen] = self.held.get(chosen, 0) + 1
        key = (pending_request.metadata.internal_request_id, chosen)
        self.counted[key] = self.counted.get(key, 0) + 1
        keys = getattr(request, "affinity", ()) if self.affinity else ()
        if not keys:
            routing.ROUTED.labels("no_key").inc()
            return
        last = self.table.lookup(keys, self.live_ids())
        routing.ROUTED.labels("new" if last is None else "affinity" if last == chosen else "overflow").inc()
        self.table.record(keys, chosen)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        key = (internal_request_id, replica_id.unique_id)
        if key not in self.counted:  # a call for one replica, not counted
            return
        self.counted[key] -= 1
        if not self.counted[key]:
            del self.counted[key]
        if key[1] in self.held:
            self.held[key[1]] -= 1

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget_replica(replica_id.unique_id)
        self.held.pop(replica_id.unique_id, None)
