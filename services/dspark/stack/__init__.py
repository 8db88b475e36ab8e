"""What starts services: building a verifier or draft service from configs and `dspark serve local`'s three processes;
may import any service folder, `dspark.runtime` and below."""
