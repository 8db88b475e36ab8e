"""What every service shares: the gRPC server shell, tensors on the wire, OpenTelemetry and Prometheus; imports
`dspark.core` and `dspark.models` only."""
