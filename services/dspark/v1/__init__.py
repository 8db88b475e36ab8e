"""dspark.v1 gRPC stubs, generated from protos/dspark/v1 by `make proto` (git-ignored build outputs)."""
