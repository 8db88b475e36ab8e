"""Prompts in, token ids out: raw text or chat messages, through the model's own tokenizer and template."""

from __future__ import annotations

Messages = list[dict[str, str]]


def encode_prompt(tokenizer, prompt: str | Messages, chat: bool | None = None) -> list[int]:
    """Chat messages always go through the chat template; raw text does when `chat` is True.

    chat=None means: use the template for raw text too when the model has one (instruct models).
    """
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty")
        use_template = tokenizer.chat_template is not None if chat is None else chat
        if not use_template:
            return tokenizer.encode(prompt, add_special_tokens=True)
        prompt = [{"role": "user", "content": prompt}]
    if not prompt:
        raise ValueError("the message list is empty")
    if tokenizer.chat_template is None:
        raise ValueError("this model has no chat template; send raw text")
    for m in prompt:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids = set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for x in gen if isinstance(gen, list) else [gen]:
        if x is not None:
            ids.add(int(x))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))
