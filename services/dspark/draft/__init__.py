"""The draft service: a thin gRPC servicer over the DSpark proposer; imports `dspark.serving`, `dspark.drafter`,
`dspark.core`, `dspark.models`, never another service folder."""
