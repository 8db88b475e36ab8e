"""Locust load tests of a dspark deployment, their load shapes, reports, fault and soak runs (not part of the
package: it drives a deployment from outside, through its public APIs, and starts local stacks with dspark.stack)."""
