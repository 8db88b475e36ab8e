"""Pure decoding: the target engine and its KV slots, sampling, lossless verification, the prefix scheduler, the decode
loop and the proposer/verifier interfaces; imports only `dspark.models` (no gRPC, no Ray, no service)."""
