"""The `make bench-*` drivers (benchmarks, not tests); may import `dspark.stack`, `dspark.runtime` and below."""
