"""The router: the decode loop behind the public gRPC and OpenAI HTTP APIs, its replica pools and remote clients of the
two services, and the Ray Serve application; imports `dspark.serving`, `dspark.core`, `dspark.models`, never another
service folder."""
