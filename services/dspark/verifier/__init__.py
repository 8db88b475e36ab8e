"""The verifier service: a thin gRPC servicer over `dspark.core.verifier`; imports `dspark.serving`, `dspark.core`,
`dspark.models`, never another service folder."""
