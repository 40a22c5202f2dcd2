"""The node pools are declared the same way in serve.gpu.yaml, cluster.yaml and the KubeRay RayService.

tests/test_multinode.py runs the graph on a cluster whose nodes are built from cluster.yaml's node
types and whose replicas ask what serve.gpu.yaml asks, so agreement here is what it tests there.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from serve_app.node_pools import node_pool_problems

ROOT = Path(__file__).resolve().parents[1]


def load(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def shipped() -> tuple[dict, dict, dict]:
    return load("configs/serve.gpu.yaml"), load("cluster.yaml"), load("deploy/kuberay/rayservice.yaml")


def test_the_shipped_files_agree():
    assert node_pool_problems(*shipped()) == []


def _aligner(serve_config: dict) -> dict:
    return next(d for d in serve_config["applications"][0]["deployments"] if d["name"] == "Aligner")


def _gpu_group(rayservice: dict) -> dict:
    return next(g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu")


BREAKAGES = {
    "a pool renamed in the serve config": (lambda s, c, r: _aligner(s)["ray_actor_options"].update(resources={"gpu-pool": 1}), "Aligner must ask"),
    "a replica without its pool": (lambda s, c, r: _aligner(s)["ray_actor_options"].pop("resources"), "Aligner must ask"),
    "a node type without its marker": (lambda s, c, r: c["available_node_types"]["gpu_workers"]["resources"].pop("gpu_pool"), "no node type offers gpu_pool"),
    "a pool on the head": (lambda s, c, r: c["available_node_types"]["head"]["resources"].update(cpu_pool=1), "head node must offer no pool"),
    "the CPU pool on GPU nodes": (lambda s, c, r: c["available_node_types"]["gpu_workers"]["resources"].update(cpu_pool=1000), "more than one node type"),
    "an aligner that no GPU node fits": (lambda s, c, r: _aligner(s)["ray_actor_options"].update(num_gpus=2), "does not fit"),
    "KubeRay's amount drifting": (lambda s, c, r: _gpu_group(r)["rayStartParams"].update(resources='"{\\"gpu_pool\\": 1}"'), "cluster.yaml 1000"),
    "a KubeRay group without a pool": (lambda s, c, r: _gpu_group(r)["rayStartParams"].pop("resources"), "offers no pool"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_each_kind_of_drift_is_named(breakage):
    mutate, expected = BREAKAGES[breakage]
    configs = copy.deepcopy(shipped())
    mutate(*configs)
    problems = node_pool_problems(*configs)
    assert any(expected in problem for problem in problems), problems
