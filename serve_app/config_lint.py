"""Strict lint of the deployment files: `python -m serve_app.config_lint configs/*.yaml cluster.yaml`.

Serve silently ignores unknown keys (a `max_ongoing_request` typo deploys with the default 5), and
`ray_actor_options` in YAML replaces the code's dict entirely. This lint fails on both, using Ray's
own schemas as the allow-list, and checks our parts (builder args, user_config) against our models.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from serve_app.settings import AlignerOptions, GraphArgs, IngressOptions, JobRunnerOptions, ScannerOptions

USER_CONFIG_MODELS: dict[str, type[BaseModel]] = {
    "Ingress": IngressOptions,
    "Scanner": ScannerOptions,
    "Aligner": AlignerOptions,
    "JobRunner": JobRunnerOptions,
}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in _models_in(argument)]


def unknown_keys(data: Any, model: type[BaseModel], path: str = "") -> list[str]:
    """Every key in `data` that `model` (recursively) does not declare."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return problems
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            problems.append(f"{path}{key}: unknown key")
            continue
        nested = _models_in(field.annotation)
        if len(nested) != 1:
            continue  # free-form dicts (args, user_config) are checked by our own models
        if isinstance(value, list):
            for index, item in enumerate(value):
                problems += unknown_keys(item, nested[0], f"{path}{key}[{index}].")
        else:
            problems += unknown_keys(value, nested[0], f"{path}{key}.")
    return problems


def _errors(error: ValidationError) -> list[str]:
    return [f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()]


def lint_serve_config(config: dict) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    problems = unknown_keys(config, ServeDeploySchema)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as error:
        problems += _errors(error)
    for app in config.get("applications", []):
        prefix = f"applications[{app.get('name')}]."
        try:
            GraphArgs.model_validate(app.get("args", {}))
        except ValidationError as error:
            problems += [prefix + "args." + line for line in _errors(error)]
        deployments = {deployment.get("name"): deployment for deployment in app.get("deployments", [])}
        if set(deployments) != set(USER_CONFIG_MODELS):
            problems.append(prefix + f"deployments must be exactly {sorted(USER_CONFIG_MODELS)}")
        for name, deployment in deployments.items():
            problems += [prefix + f"{name}." + line for line in _lint_deployment(name, deployment)]
    return problems


def _lint_deployment(name: str, deployment: dict) -> list[str]:
    problems: list[str] = []
    model = USER_CONFIG_MODELS.get(name)
    if model is None:
        return [f"unknown deployment {name!r}"]
    try:
        options = model.model_validate(deployment.get("user_config", {}))
    except ValidationError as error:
        return ["user_config." + line for line in _errors(error)]
    actor_options = deployment.get("ray_actor_options", {})
    if "num_cpus" not in actor_options:
        # The YAML dict replaces the class default entirely: a missing num_cpus silently becomes 1.
        problems.append("ray_actor_options must set num_cpus")
    if name == "Aligner":
        if "num_gpus" not in actor_options:
            problems.append("ray_actor_options must set num_gpus")
        if deployment.get("max_ongoing_requests", 5) < options.max_batch_size:
            problems.append("max_ongoing_requests must be >= user_config.max_batch_size, or batches never fill")
    if name == "Scanner" and deployment.get("max_ongoing_requests", 5) < options.max_concurrent_scans:
        problems.append("max_ongoing_requests must be >= user_config.max_concurrent_scans, or scan slots never fill")
    if "max_queued_requests" not in deployment:
        problems.append("max_queued_requests must be set (Serve's default queue is unbounded)")
    return problems


def lint_cluster_config(config: dict) -> list[str]:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    problems = [f"{'.'.join(str(part) for part in error.path)}: {error.message}" for error in validator.iter_errors(config)]
    node_types = config.get("available_node_types", {})
    head = node_types.get(config.get("head_node_type"), {})
    if head.get("resources", {}).get("CPU") != 0:
        problems.append("the head node must advertise CPU: 0 so no replica lands on it")
    if not any(node.get("resources", {}).get("GPU") for node in node_types.values()):
        problems.append("no GPU worker pool for the aligner")
    if not any("--metrics-export-port" in command for command in config.get("head_start_ray_commands", [])):
        problems.append("head_start_ray_commands must fix --metrics-export-port for Prometheus")
    return problems


def lint_file(path: Path) -> list[str]:
    config = yaml.safe_load(path.read_text())
    lint = lint_cluster_config if "available_node_types" in config else lint_serve_config
    return lint(config)


def main(paths: list[str]) -> int:
    failed = False
    for path in paths:
        problems = lint_file(Path(path))
        for problem in problems:
            print(f"{path}: {problem}")
        failed |= bool(problems)
        if not problems:
            print(f"{path}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
