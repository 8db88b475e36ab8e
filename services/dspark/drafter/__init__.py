"""The DSpark drafter and everything that makes one: the model, its loss, its proposer, training data, training,
evaluation and checkpoints; imports `dspark.core` and `dspark.models`."""
