"""Node pools: which nodes each deployment's replicas may run on, and the check that every file agrees.

A production cluster has three kinds of node: a head that runs only Ray's and Serve's control plane,
a CPU pool for Ingress, Scanner and JobRunner replicas, and a GPU pool for Aligner replicas. Each
pool's nodes advertise a marker resource (`cpu_pool`, `gpu_pool`) and each replica asks for one
unit of its pool's marker in `ray_actor_options.resources`. Custom resources, not node labels:
Ray's label selectors are still marked experimental in 2.60, while custom resources are what both
autoscalers (the cluster launcher's and KubeRay's) have always matched pending replicas against.

The marker is declared in three files that nothing but this check ties together: the replicas'
requests in configs/serve.gpu.yaml (and its copy in the RayService), the node types of cluster.yaml,
and the worker groups of deploy/kuberay/rayservice.yaml. If one drifts (a pool renamed, a node type
without its marker), replicas stay pending forever on a real cluster, or land where they should not.
"""

from __future__ import annotations

import json

POOL_OF_DEPLOYMENT = {"Ingress": "cpu_pool", "Scanner": "cpu_pool", "JobRunner": "cpu_pool", "Aligner": "gpu_pool"}
POOLS = frozenset(POOL_OF_DEPLOYMENT.values())
GPU_POOL = "gpu_pool"


def pools_asked(deployment: dict) -> set[str]:
    return POOLS & deployment.get("ray_actor_options", {}).get("resources", {}).keys()


def pools_offered(resources: dict) -> set[str]:
    return POOLS & resources.keys()


def kuberay_group_resources(group: dict) -> dict:
    """Custom resources of a KubeRay group: `rayStartParams.resources` is JSON inside quotes, as `ray start` takes it."""
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def node_pool_problems(serve_config: dict, cluster_config: dict, rayservice: dict) -> list[str]:
    """Every way the three files disagree about the pools; [] when they agree."""
    problems: list[str] = []
    (app,) = serve_config["applications"]
    deployments = {deployment["name"]: deployment for deployment in app["deployments"]}
    for name, deployment in deployments.items():
        if pools_asked(deployment) != {POOL_OF_DEPLOYMENT.get(name)}:
            problems.append(f"serve config: {name} must ask for exactly {POOL_OF_DEPLOYMENT.get(name)}, asks {sorted(pools_asked(deployment))}")

    node_types = cluster_config["available_node_types"]
    if pools_offered(node_types[cluster_config["head_node_type"]]["resources"]):
        problems.append("cluster.yaml: the head node must offer no pool")
    offered_by: dict[str, dict] = {}
    for name, node_type in node_types.items():
        for pool in pools_offered(node_type["resources"]):
            if pool in offered_by:
                problems.append(f"cluster.yaml: {pool} offered by more than one node type")
            offered_by[pool] = node_type["resources"]
    for pool in POOLS - offered_by.keys():
        problems.append(f"cluster.yaml: no node type offers {pool}")
    for pool, resources in offered_by.items():
        if bool(resources.get("GPU")) != (pool == GPU_POOL):
            problems.append(f"cluster.yaml: {pool} nodes must {'' if pool == GPU_POOL else 'not '}have GPUs")
    for name, deployment in deployments.items():
        node = offered_by.get(POOL_OF_DEPLOYMENT.get(name), {})
        options = deployment.get("ray_actor_options", {})
        if node and (node.get("CPU", 0) < options.get("num_cpus", 1) or node.get("GPU", 0) < options.get("num_gpus", 0)):
            problems.append(f"cluster.yaml: one {name} replica does not fit its pool's node")

    cluster = rayservice["spec"]["rayClusterConfig"]
    if pools_offered(kuberay_group_resources(cluster["headGroupSpec"])):
        problems.append("rayservice: the head group must offer no pool")
    groups_of: dict[str, list[str]] = {}
    for group in cluster["workerGroupSpecs"]:
        resources = kuberay_group_resources(group)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        for pool in pools_offered(resources):
            groups_of.setdefault(pool, []).append(group["groupName"])
            if resources[pool] != offered_by.get(pool, {}).get(pool):
                problems.append(f"rayservice: group {group['groupName']} offers {pool}: {resources[pool]}, cluster.yaml {offered_by.get(pool, {}).get(pool)}")
            if ("nvidia.com/gpu" in limits) != (pool == GPU_POOL):
                problems.append(f"rayservice: group {group['groupName']} offers {pool} but its pods {'lack' if pool == GPU_POOL else 'have'} a GPU")
        if not pools_offered(resources):
            problems.append(f"rayservice: group {group['groupName']} offers no pool: no replica could run there")
    for pool in POOLS - groups_of.keys():
        problems.append(f"rayservice: no group offers {pool}")
    return problems
