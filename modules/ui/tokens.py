"""The prompt token counter: tokens used / what the 75-token chunks hold, as A1111 shows it."""
from __future__ import annotations

from modules.text import prompt_parser
from modules.text.chunking import chunk_prompt, target_token_count
from modules.text.tokenizer import special_tokens, tokenize_many


def count_tokens(tokenizer, prompt: str, steps: int = 20) -> tuple[int, int]:
    """(tokens, chunk capacity) of the longest sub-prompt over the prompt-editing schedule."""
    text, _ = prompt_parser.extract_extra_networks(prompt or "")
    schedules = prompt_parser.get_learned_conditioning_prompt_schedules([text], max(int(steps or 1), 1))[0]
    ids = special_tokens(tokenizer)
    longest = 0
    for _, scheduled in schedules:
        for part, _weight in prompt_parser.split_and(scheduled):
            fragments = prompt_parser.parse_prompt_attention(part)
            tokenized = tokenize_many(tokenizer, [str(f[0]) for f in fragments])
            longest = max(longest, chunk_prompt(fragments, tokenized, ids).token_count)
    return longest, target_token_count(longest)


def counter_text(tokenizer, prompt: str, steps: int = 20) -> str:
    used, capacity = count_tokens(tokenizer, prompt, steps)
    return f"{used}/{capacity}"
