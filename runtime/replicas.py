"""`gptj-tvm serve --replicas N` as a Ray Serve application: N engine replicas behind one ingress.

Each EngineReplica is the single server's app (runtime/server.py's create_app: the same routes, engine and
metrics) run in a Ray actor with its share of the cores: TVM's threads are the CPUs Ray assigned the actor. It
loads the artifact itself, from a path every node sees, before it counts as ready, so the router never sends a
request to a replica still loading (a restarted one included). The Ingress (runtime/replica_ingress.py) is what
Ray's HTTP proxy calls; runtime/replica_router.py routes its calls to the engines.

build_app gives the application (runtime/cluster.py runs it for the CLI); `app_builder` is the same for a Ray
Serve config file (`import_path: gptj_tvm.runtime.replicas:app_builder`, as docs/kuberay-rayservice.yaml does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from gptj_tvm.core.errors import GptjError

from .artifact import ArtifactMetadata
from .asgi_call import call_asgi
from .replica_ingress import FLUSH_SECONDS, Ingress
from .replica_router import PrefixAffinityRouter
from .replica_routing import ForwardedRequest
from .serve_options import ReplicaOptions, ServeOptions

APP_NAME = "gptj-tvm"
CONTROL_CALLS = 4  # room past the engine's own limits for /health, /metrics and drain calls


def threads_for(assigned: dict) -> int:
    """TVM threads for the CPUs Ray assigned this actor (a fraction still gets one)."""
    return max(1, int(assigned.get("CPU", 1)))


class EngineReplica:
    async def __init__(self, artifact: str, options: ServeOptions):
        self.threads = threads_for(ray.get_runtime_context().get_assigned_resources())
        # TVM's thread pool reads this once, when it first runs; importing gptj_tvm set the machine's count
        os.environ["TVM_NUM_THREADS"] = str(self.threads)
        if "tvm" not in sys.modules and ArtifactMetadata.read(Path(artifact)).device in ("cpu", "vulkan"):
            os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the runtime library alone, as the CLI loads it
        from .server import create_app

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()
        self.app = create_app(artifact, options)
        self.served = self.app.state.served
        self.forwarding = 0
        self.draining: asyncio.Task | None = None
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        while self.served.phase == "loading":
            await asyncio.sleep(0.05)
        if self.served.phase != "ready":
            await self.lifespan.__aexit__(None, None, None)
            raise GptjError(f"cannot serve {artifact}: {self.served.load_error}")

    async def forward(self, request: ForwardedRequest):
        """(status, headers, this replica's id), then (body, more_body) messages: the app's answer."""
        self.forwarding += 1
        answer = call_asgi(self.app, request)
        try:
            status, headers = await answer.__anext__()
            yield status, headers, self.replica
            async for message in answer:
                yield message
        finally:
            await answer.aclose()  # now, not when collected: a caller gone away cancels its engine requests
            self.forwarding -= 1

    async def state(self, _request: ForwardedRequest, with_metrics: bool = False) -> dict:
        drained = self.draining is not None and self.draining.done()
        state = {"replica": self.replica, "phase": "drained" if drained else self.served.phase, "pid": os.getpid(),
                 "node": self.node, "threads": self.threads}
        if with_metrics:
            state["metrics"] = self.served.metrics.scrape(self.served.engine).decode()
        return state

    async def drain(self, _request: ForwardedRequest, seconds: float) -> None:
        """Starts what `serve` does on SIGTERM: new requests get 503, those held get `seconds`, the rest end;
        `state` says "drained" once the handlers have passed on the last events."""
        if self.served.phase == "ready":
            self.served.phase = "draining"
            self.draining = asyncio.create_task(self._drain(seconds))

    async def _drain(self, seconds: float) -> None:
        await asyncio.to_thread(self.served.engine.shutdown, seconds)
        deadline = time.monotonic() + FLUSH_SECONDS
        while self.forwarding and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def __del__(self):
        await self.lifespan.__aexit__(None, None, None)


def build_app(artifact, options: ServeOptions, replicas: ReplicaOptions, cpus: float):
    """The application: `cpus` CPUs for each engine replica, an ingress with none."""
    if replicas.autoscaling:
        low = replicas.min_replicas if replicas.min_replicas is not None else 1
        high = replicas.max_replicas if replicas.max_replicas is not None else max(replicas.replicas, low)
        # a replica is as busy as it should be when each of its slots holds a request
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                          "initial_replicas": min(max(replicas.replicas, low), high),
                                          "target_ongoing_requests": options.max_batch}}
    else:
        scaling = {"num_replicas": replicas.replicas}
    shutdown_s = options.drain_seconds + 2 * FLUSH_SECONDS
    router = RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                 request_router_kwargs={"room": options.max_batch,
                                                        "affinity": replicas.prefix_routing})
    engine = serve.deployment(EngineReplica, name="EngineReplica", ray_actor_options={"num_cpus": cpus},
                              max_ongoing_requests=options.max_batch + options.max_queue + CONTROL_CALLS,
                              graceful_shutdown_timeout_s=shutdown_s, request_router_config=router, **scaling)
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1 << 16,
                               graceful_shutdown_timeout_s=shutdown_s + FLUSH_SECONDS)
    return ingress.bind(engine.bind(str(Path(artifact).resolve()), options), options)


def app_builder(args: dict):
    """For a Ray Serve config's import_path: args are `artifact`, `replica_cpus`, and any field of ServeOptions
    or ReplicaOptions by name."""
    fields = {f.name for f in dataclasses.fields(ServeOptions)}
    replica_fields = {f.name for f in dataclasses.fields(ReplicaOptions)}
    unknown = set(args) - fields - replica_fields - {"artifact"}
    if "artifact" not in args or unknown:
        raise GptjError(f"app_builder needs 'artifact' and takes ServeOptions and ReplicaOptions fields"
                        f"{'; unknown: ' + ', '.join(sorted(unknown)) if unknown else ''}")
    options = ServeOptions(**{k: v for k, v in args.items() if k in fields})
    replicas = ReplicaOptions(**{k: v for k, v in args.items() if k in replica_fields})
    return build_app(args["artifact"], options, replicas, replicas.replica_cpus or 1)
