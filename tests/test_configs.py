"""The deployment files pass a strict lint, and the lint catches what Serve would silently accept."""

import copy
from pathlib import Path

import pytest
import yaml

from serve_app.config_lint import lint_cluster_config, lint_file, lint_serve_config
from serve_app.settings import IngressOptions, ScannerOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["configs/serve.yaml", "configs/serve.gpu.yaml", "cluster.yaml"])
def test_repository_configs_are_clean(path):
    assert lint_file(ROOT / path) == []


def serve_config() -> dict:
    return yaml.safe_load((ROOT / "configs/serve.yaml").read_text())


def deployment(config: dict, name: str) -> dict:
    return deployment_in(config["applications"][0], name)


def deployment_in(app: dict, name: str) -> dict:
    return next(item for item in app["deployments"] if item["name"] == name)


def mutated(mutate) -> list[str]:
    config = copy.deepcopy(serve_config())
    mutate(config)
    return lint_serve_config(config)


def test_typo_in_a_serve_option_is_caught():
    problems = mutated(lambda config: deployment(config, "Aligner").update(max_ongoing_request=16))
    assert any("max_ongoing_request: unknown key" in problem for problem in problems)


def test_typo_in_nested_options_is_caught():
    problems = mutated(lambda config: deployment(config, "Scanner")["autoscaling_config"].update(max_replica=3))
    assert any("max_replica: unknown key" in problem for problem in problems)
    problems = mutated(lambda config: config["http_options"].update(hostname="0.0.0.0"))
    assert any("hostname: unknown key" in problem for problem in problems)


def test_typo_in_user_config_and_args_is_caught():
    assert mutated(lambda config: deployment(config, "Ingress")["user_config"].update(max_upload=1))
    assert mutated(lambda config: config["applications"][0]["args"].update(backend="whisper"))


def test_batch_larger_than_max_ongoing_requests_is_caught():
    problems = mutated(lambda config: deployment(config, "Aligner")["user_config"].update(max_batch_size=32))
    assert any("max_ongoing_requests must be >=" in problem for problem in problems)


def test_actor_options_without_num_cpus_are_caught():
    problems = mutated(lambda config: deployment(config, "Scanner").update(ray_actor_options={"memory": 10**9}))
    assert any("num_cpus" in problem for problem in problems)


def test_cluster_schema_violations_are_caught():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["max_worker"] = 3
    config["available_node_types"]["head"]["resources"]["CPU"] = 4
    problems = lint_cluster_config(config)
    assert any("max_worker" in problem for problem in problems)
    assert any("CPU: 0" in problem for problem in problems)


@pytest.mark.parametrize("path", ["configs/serve.yaml", "configs/serve.gpu.yaml"])
def test_every_plan_can_hold_the_longest_audio_its_application_admits(path):
    # Audio seconds are charged whole: a bucket smaller than the longest admitted upload would
    # refuse that upload forever. The scanner's cap bounds what is decoded at all.
    config = yaml.safe_load((ROOT / path).read_text())
    for app in config["applications"]:
        ingress = IngressOptions.model_validate(deployment_in(app, "Ingress")["user_config"])
        scanner = ScannerOptions.model_validate(deployment_in(app, "Scanner")["user_config"])
        for name, plan in ingress.plans.items():
            longest = min(ingress.longest_audio_seconds(plan), scanner.max_decoded_seconds)
            assert plan.audio_seconds_burst >= longest, (path, name)


def test_plan_whose_audio_bucket_cannot_hold_the_longest_audio_is_caught():
    small = {"standard": {"audio_seconds_burst": 300}}
    problems = mutated(lambda config: deployment(config, "Ingress")["user_config"].update(plans=small))
    assert any("plan 'standard'" in problem and "could never be served" in problem for problem in problems), problems
    # Lowering the plan's own longest upload to what its bucket holds is a valid fix.
    fitted = {"standard": {"audio_seconds_burst": 300, "max_audio_seconds": 300}}
    assert mutated(lambda config: deployment(config, "Ingress")["user_config"].update(plans=fitted)) == []


def test_the_plan_limit_never_raises_the_ingress_limit():
    options = IngressOptions(max_audio_seconds=120, plans={"standard": {"max_audio_seconds": 900, "audio_seconds_burst": 120}})
    assert options.longest_audio_seconds(options.plans["standard"]) == 120


def test_make_serve_prints_the_curl_line_without_the_key():
    import subprocess

    recipe = subprocess.run(["make", "-n", "serve"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    echo = next(line for line in recipe.splitlines() if "curl -s" in line)
    printed = subprocess.run(["sh", "-c", echo], capture_output=True, text=True, check=True).stdout
    assert 'Bearer $(cat var/dev-api-key)"' in printed
