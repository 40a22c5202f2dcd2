"""Node loss and scale-out on a multi-node cluster: the figures of docs/scaling.md ("Measured on a multi-node cluster").

    python -m bench.multinode [--clients 8] [--rejoin-after-s 20] [--scenarios gpu,cpu,step]

The cluster is tests/support/multinode.py's: a head, two CPU-pool and two GPU-pool raylets built from
cluster.yaml's node types, the graph (PocketSphinx) placed as configs/serve.gpu.yaml asks, with real
Redis and clamd. Three scenarios, one after the other:

1. GPU node loss: two Aligner replicas, one per GPU-pool node. Under `--clients` clients, one GPU
   node is killed (SIGKILL to its raylet and everything under it); a replacement node joins
   `--rejoin-after-s` later.
2. CPU node loss: the same with a CPU-pool node (an Ingress and a Scanner replica are on each).
3. Load step: autoscaling on (tests/support/multinode.py FAST_AUTOSCALING), 1 client, then
   `--clients`, then 1 again; the Scanner and Aligner replica counts are sampled every second.

Printed against the targets of issue 16: no request longer than `align_timeout_s`; >= 95 % of the
requests started in the minute after a kill succeed; full capacity (every replica RUNNING again)
within 30 s of the replacement node joining; the load step reaching the maximum replica counts and
back to the minimum, each within twice the configured delay (upscale_delay_s, downscale_delay_s).
"""

from __future__ import annotations

import argparse
import time

import yaml

from bench.stack import BENCH_PLAN, Stack
from tests.support.cluster import SERVE_YAML, deploy
from tests.support.multinode import (
    ALIGN_TIMEOUT_S, APP, CLIP, CLIP_TEXT, FAST_AUTOSCALING, STEP_REPLICAS, Load, PoolCluster, pool_graph, running_replicas, start_serve_on_head, wait_for,
)

TARGET_SUCCESS = 0.95
TARGET_RECOVERY_S = 30.0
WINDOW_S = 60.0
NODE_LOSS_REPLICAS = {"Ingress": 2, "Scanner": 2, "JobRunner": 1, "Aligner": 2}
STEP_RANGES = {"Ingress": 2, "JobRunner": 1, **STEP_REPLICAS}
SCALED = tuple(STEP_REPLICAS)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def throughput(outcomes, start: float, end: float) -> float:
    return sum(1 for o in outcomes if start <= o.started + o.seconds < end and o.status == 200) / (end - start)


def node_loss(cluster: PoolCluster, url: str, api_key: str, node_type: str, clients: int, rejoin_after_s: float) -> bool:
    deploy([pool_graph(NODE_LOSS_REPLICAS)])
    wait_for(lambda: running_replicas(APP) == NODE_LOSS_REPLICAS, 180, what="replicas running")
    doomed = next(node for node in cluster.nodes_of(node_type) if cluster.replicas_on(node, "Aligner" if node_type == "gpu_workers" else "Ingress"))
    with Load(url, api_key, CLIP.read_bytes(), CLIP_TEXT, clients, timeout_s=ALIGN_TIMEOUT_S + 60) as load:
        time.sleep(15)
        before = throughput(load.outcomes, time.monotonic() - 10, time.monotonic())
        cluster.kill_node(doomed)
        killed = time.monotonic()
        time.sleep(rejoin_after_s)
        cluster.add_node(node_type)
        joined = time.monotonic()
        # Full capacity: every replica RUNNING, and none still counted on the lost node.
        wait_for(lambda: running_replicas(APP) == NODE_LOSS_REPLICAS and not any(cluster.replicas_on(doomed, name) for name in NODE_LOSS_REPLICAS), 300, interval_s=0.25, what="full capacity")
        recovered = time.monotonic()
        time.sleep(max(0.0, killed + WINDOW_S + 10 - time.monotonic()))  # the minute after the kill, plus its answers
        after = throughput(load.outcomes, time.monotonic() - 10, time.monotonic())
    window = [o for o in load.outcomes if killed <= o.started < killed + WINDOW_S]
    succeeded = sum(1 for o in window if o.status == 200)
    statuses = sorted({o.status for o in window})
    longest = max(o.seconds for o in load.outcomes)
    share = succeeded / len(window)
    recovery = recovered - joined
    print(f"\n{node_type} node lost under {clients} clients (replacement joined {rejoin_after_s:.0f} s after the kill)")
    print(f"  requests started in the minute after the kill: {len(window)}, succeeded {succeeded} ({share:.1%}), statuses {statuses}   target >= {TARGET_SUCCESS:.0%}: {verdict(share >= TARGET_SUCCESS)}")
    print(f"  longest request: {longest:.1f} s   target < align_timeout_s {ALIGN_TIMEOUT_S} s: {verdict(longest < ALIGN_TIMEOUT_S)}")
    print(f"  every replica RUNNING again {recovery:.1f} s after the replacement joined ({recovered - killed:.1f} s after the kill)   target <= {TARGET_RECOVERY_S:.0f} s: {verdict(recovery <= TARGET_RECOVERY_S)}")
    print(f"  throughput (requests/s, 10 s windows): {before:.1f} before the kill, {after:.1f} after recovery")
    return share >= TARGET_SUCCESS and longest < ALIGN_TIMEOUT_S and recovery <= TARGET_RECOVERY_S


def counts() -> tuple[int, ...]:
    running = running_replicas(APP)
    return tuple(running.get(name, 0) for name in SCALED)


def load_step(url: str, api_key: str, clients: int) -> bool:
    deploy([pool_graph(STEP_RANGES, FAST_AUTOSCALING)])
    minimum = tuple(STEP_RANGES[name][0] for name in SCALED)
    maximum = tuple(STEP_RANGES[name][1] for name in SCALED)
    wait_for(lambda: counts() == minimum, 180, what="minimum replicas")
    up_delay = max(FAST_AUTOSCALING[name]["upscale_delay_s"] for name in SCALED)
    down_delay = max(FAST_AUTOSCALING[name]["downscale_delay_s"] for name in SCALED)
    samples: list[tuple[float, tuple[int, ...]]] = []
    audio = CLIP.read_bytes()
    with Load(url, api_key, audio, CLIP_TEXT, 1, timeout_s=ALIGN_TIMEOUT_S):
        time.sleep(10)
        with Load(url, api_key, audio, CLIP_TEXT, clients - 1, timeout_s=ALIGN_TIMEOUT_S):
            stepped_up = time.monotonic()
            reached_max = _sample_until(samples, stepped_up, lambda now: now == maximum, 120)
            time.sleep(5)
        stepped_down = time.monotonic()
        reached_min = _sample_until(samples, stepped_down, lambda now: now == minimum, 180)
    up_s, down_s = reached_max - stepped_up, reached_min - stepped_down
    print(f"\nload step 1 -> {clients} -> 1 clients, autoscaling {SCALED} from {minimum} to {maximum} replicas")
    print("  replica counts over time (s since the step up: Scanner, Aligner): " + ", ".join(f"{t:.0f}: {c}" for t, c in _changes(samples, stepped_up)))
    print(f"  maximum reached {_seconds(up_s)} after the step up   target <= 2 x upscale_delay_s = {2 * up_delay:.0f} s: {verdict(up_s <= 2 * up_delay)}")
    print(f"  minimum reached {_seconds(down_s)} after the step down   target <= 2 x downscale_delay_s = {2 * down_delay:.0f} s: {verdict(down_s <= 2 * down_delay)}")
    for index, name in enumerate(SCALED):  # each deployment on its own: the Scanner's load follows the Aligner's scale-out
        up = _first(samples, stepped_up, index, maximum[index]) - stepped_up
        down = _first(samples, stepped_down, index, minimum[index]) - stepped_down
        print(f"  {name}: maximum {_seconds(up)} after the step up, minimum {_seconds(down)} after the step down")
    return up_s <= 2 * up_delay and down_s <= 2 * down_delay


def _seconds(elapsed: float) -> str:
    return "never" if elapsed == float("inf") else f"{elapsed:.1f} s"


def _sample_until(samples: list, since: float, done, timeout_s: float) -> float:
    """When the counts first satisfy `done` (infinity: not within `timeout_s`), sampling every 0.5 s."""
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        now = counts()
        samples.append((time.monotonic(), now))
        if done(now):
            return time.monotonic()
        time.sleep(0.5)
    return float("inf")


def _first(samples: list, since: float, index: int, value: int) -> float:
    """When deployment `index` first had `value` replicas at or after `since` (infinity: never)."""
    return next((moment for moment, now in samples if moment >= since and now[index] == value), float("inf"))


def _changes(samples: list, origin: float) -> list[tuple[float, tuple[int, ...]]]:
    changes, last = [], None
    for moment, value in samples:
        if value != last:
            changes.append((moment - origin, value))
            last = value
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rejoin-after-s", type=float, default=20.0)
    parser.add_argument("--scenarios", default="gpu,cpu,step", help="which to run, comma-separated: gpu, cpu, step")
    arguments = parser.parse_args()
    scenarios = set(arguments.scenarios.split(","))

    stack = Stack()
    started = time.monotonic()
    cluster = PoolCluster(cpu_nodes=2, gpu_nodes=2).start()
    try:
        url = start_serve_on_head(yaml.safe_load(SERVE_YAML.read_text())["http_options"])
        deploy([pool_graph(NODE_LOSS_REPLICAS)])
        print(f"cluster of {len(cluster.node_types)} raylets and the graph up in {time.monotonic() - started:.0f} s; placement: {cluster.replica_nodes()}")
        api_key = stack.api_key(BENCH_PLAN)
        results = []
        for node_type in ("gpu", "cpu"):
            if node_type in scenarios:
                results.append(node_loss(cluster, url, api_key, f"{node_type}_workers", arguments.clients, arguments.rejoin_after_s))
        if "step" in scenarios:
            results.append(load_step(url, api_key, arguments.clients))
        print(f"\nall figures met: {all(results)}")
    finally:
        from ray import serve

        serve.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
