"""The Serve application: the whole graph, wired in one place.

    client -> Ingress (auth, limits, validation) -> Scanner (sniff, decode) -> Aligner (continuous batching)
                 Ingress (POST /v1/jobs: queued in Redis) ... JobRunner (Redis stream) -> Aligner

`build_app` is the `import_path` target of configs/serve.yaml; its `args` are `GraphArgs`.
Per-deployment resources, autoscaling and live knobs (`user_config`) come from the YAML's
`deployments:` section, over the defaults declared on each deployment class.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.aligner import Aligner
from deployments.ingress import Ingress
from deployments.job_runner import JobRunner
from deployments.scanner import Scanner
from serve_app.settings import GraphArgs


def build_app(args: dict[str, Any]) -> Application:
    graph = GraphArgs.model_validate(args)
    aligner = Aligner.bind(graph)
    return Ingress.bind(Scanner.bind(), aligner, JobRunner.bind(aligner))
