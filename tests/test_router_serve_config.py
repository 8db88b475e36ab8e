"""`dspark serve router --config FILE`: a Serve config file (deploy/serve.yaml, the Helm chart's ConfigMap) gives the
router's ports, application args and deployment options; ${VAR}s come from the environment (the Service addresses
Kubernetes injects), and one that is not set is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspark.router.app import DSparkRouter, RouterArgs
from dspark.router.serve import expand_env, read_serve_config

SERVE_YAML = Path(__file__).parents[1] / "deploy" / "serve.yaml"


def test_the_repository_serve_config_gives_ports_args_and_autoscaling():
    c = read_serve_config(SERVE_YAML.read_text(), {})
    assert (c.http_port, c.grpc_port) == (8000, 50051)
    args = RouterArgs(**c.args)
    assert (args.verifier, args.draft, args.policy, args.max_queue) == (
        "127.0.0.1:50061",
        "127.0.0.1:50062",
        "dspark",
        1024,
    )
    assert c.deployment["autoscaling_config"]["max_replicas"] == 4
    assert args.config().max_request_bytes == 1 << 20  # the HTTP body limit is set, and is the router's default
    assert RouterArgs.model_fields.keys() >= c.args.keys()  # no key the router would not read
    DSparkRouter.options(**c.deployment)  # every option is one Serve's deployment takes


def test_service_addresses_are_filled_in_from_the_environment():
    text = SERVE_YAML.read_text().replace("127.0.0.1:50061", "${V_HOST}:${V_PORT}")
    c = read_serve_config(text, {"V_HOST": "10.0.0.7", "V_PORT": "50061"})
    assert c.args["verifier"] == "10.0.0.7:50061"


def test_an_unset_variable_is_named_in_the_error():
    with pytest.raises(ValueError, match="DSPARK_VERIFIER_SERVICE_HOST"):
        expand_env("verifier: ${DSPARK_VERIFIER_SERVICE_HOST}:50061", {})


def test_a_dollar_sign_without_braces_is_left_alone():
    assert expand_env("key: a$b $(X)", {}) == "key: a$b $(X)"


def test_a_config_without_the_router_application_is_refused():
    with pytest.raises(ValueError, match="dspark.router.app:app_builder"):
        read_serve_config("applications:\n  - name: other\n    import_path: x:y\n", {})
