"""`gptj-tvm serve ARTIFACT --replicas N [--ray-address ADDR]`: the application of runtime/replicas.py on a Ray
cluster, until SIGINT or SIGTERM.

Without --ray-address, a Ray head starts in this process's shadow on 127.0.0.1 (no dashboard) and stops with it;
with one, this process joins that cluster as a driver and, when it ends, deletes its application and leaves Ray
Serve and the cluster running. The HTTP proxy listens on --host:--port. The first signal drains (the ingress
answers 503, each engine finishes what it holds within --drain-seconds and ends the rest as `serve` does), then
the application is deleted and this process exits 0; a second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time

from gptj_tvm.core.errors import GptjError

from .serve_options import ReplicaOptions, ServeOptions

NEEDS_RAY = "--replicas needs Ray Serve: pip install -e '.[cluster]'"
READY_TIMEOUT_S = 1800  # loading GPT-J-6B from a cold disk on every replica at once


def say(message: str) -> None:
    print(f"gptj-tvm serve: {message}", file=sys.stderr, flush=True)


def import_ray():
    """ray and ray.serve, or GptjError in one line."""
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise GptjError(f"{NEEDS_RAY} ({err})") from None
    return ray, serve


def cpus_per_replica(total_cpus: float, replicas: ReplicaOptions) -> float:
    if replicas.replica_cpus is not None:
        return replicas.replica_cpus
    return max(1, int(total_cpus) // replicas.most)


def check_port_free(host: str, port: int) -> None:
    """Ray's proxy retries a port in use without saying so: refuse it here, in one line."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise GptjError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def start_ray(ray, address: str | None) -> None:
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this process says what matters itself
    if address is None:
        ray.init(address="local", _node_ip_address="127.0.0.1", **options)
    else:
        ray.init(address=address, **options)


def wait_running(serve, name: str, stop: threading.Event) -> bool:
    """Until the application runs (True) or a signal came (False); replicas that failed to start (after Ray's
    retries) as GptjError, in one line: the first replica's own."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.wait(0.5):
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return True
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            texts = [d.message for d in status.deployments.values() if d.message] + [status.message]
            lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
            ours = [line.split("GptjError: ", 1)[-1] for line in lines if "cannot serve" in line]
            raise GptjError((ours or lines or ["the replicas failed to start"])[-1])
        if time.monotonic() > deadline:
            raise GptjError(f"the replicas were not ready after {READY_TIMEOUT_S} s")
    return False


def wait_routable(serve, name: str, replicas: int, stop: threading.Event) -> None:
    """Until the ingress routes to `replicas` engines: the application runs a moment before its handle knows
    every replica, and requests in that moment would all go to the first."""
    ingress = serve.get_app_handle(name)
    deadline = time.monotonic() + 60
    while len(ingress.known_replicas.remote().result(timeout_s=30)) < replicas and time.monotonic() < deadline:
        if stop.wait(0.2):
            return


def serve_replicas(artifact, host: str, port: int, options: ServeOptions, replicas: ReplicaOptions) -> None:
    """Serve until SIGINT or SIGTERM, then drain. Raises GptjError (one line) if the replicas cannot start."""
    ray, serve = import_ray()
    from ray.serve.api import RunTarget

    from .replicas import APP_NAME, build_app

    if replicas.ray_address is None:
        check_port_free(host, port)
    stop = threading.Event()
    signals = []

    def on_signal(signum, _frame) -> None:
        signals.append(signum)
        if len(signals) > 1:
            raise KeyboardInterrupt  # a second signal: stop at once
        stop.set()

    start_ray(ray, replicas.ray_address)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own
        signal.signal(sig, on_signal)
    try:
        total = ray.cluster_resources().get("CPU", 0)
        cpus = cpus_per_replica(total, replicas)
        least = replicas.min_replicas if replicas.min_replicas is not None else replicas.replicas
        if least * cpus > total:
            raise GptjError(f"{least} replicas of {cpus:g} CPUs need {least * cpus:g}; the cluster has {total:g}")
        serve.start(http_options={"host": host, "port": port})
        app = build_app(artifact, options, replicas, cpus)
        serve.run_many([RunTarget(target=app, name=APP_NAME, route_prefix="/")],
                       wait_for_applications_running=False)
        if not wait_running(serve, APP_NAME, stop):
            say("stopped before the replicas were ready")
            return
        wait_routable(serve, APP_NAME, replicas.replicas, stop)
        scaling = f", autoscaling {replicas.min_replicas}-{replicas.max_replicas}" if replicas.autoscaling else ""
        say(f"{replicas.replicas} replicas of {artifact} ({cpus:g} CPUs, {max(1, int(cpus))} TVM threads each"
            f"{scaling}) ready on http://{host}:{port}/v1")
        while not stop.wait(0.5):
            pass
        say(f"draining: new requests get 503; running ones have {options.drain_seconds:g} s to finish")
        try:
            drained = serve.get_app_handle(APP_NAME).drain.remote(options.drain_seconds).result(
                timeout_s=options.drain_seconds + 60)
            say(f"drained {len(drained)} replicas; stopping")
        except Exception as err:  # noqa: BLE001  (what the drain could not finish ends with the application)
            say(f"the drain did not finish ({type(err).__name__}: {str(err).strip().splitlines()[-1:]}); stopping")
    finally:
        if replicas.ray_address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
