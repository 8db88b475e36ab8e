"""The dspark command's environment defaults."""

from dspark import cli


def test_a_kubernetes_service_link_in_a_port_variable_leaves_the_default_port(monkeypatch):
    # a release named dspark has a Service dspark-verifier: Kubernetes sets DSPARK_VERIFIER_PORT=tcp://IP:PORT
    monkeypatch.setenv("DSPARK_VERIFIER_PORT", "tcp://10.96.0.12:50061")
    assert cli._env("VERIFIER_PORT", 50061) == 50061


def test_a_port_variable_set_by_the_user_is_the_default_port(monkeypatch):
    monkeypatch.setenv("DSPARK_VERIFIER_PORT", "50071")
    assert int(cli._env("VERIFIER_PORT", 50061)) == 50071
