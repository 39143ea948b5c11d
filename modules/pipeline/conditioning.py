"""Prompts -> scheduled, cached text conditioning for the CFG denoiser."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from modules.sampling.denoisers import Cond, ScheduledCond
from modules.text import prompt_parser


class PromptConditioner:
    """Encodes each distinct prompt text once per job and builds A1111's schedules."""

    def __init__(self, text_conditioner, clip_skip: int = 1, emphasis: str = "Original",
                 zero_empty_negative: bool = False, embeddings=None) -> None:
        self.text = text_conditioner
        self.embeddings = embeddings  # the job's textual-inversion EmbeddingLookup, or None
        self.zero_empty_negative = zero_empty_negative  # SDXL: an empty negative is all zeros, as A1111
        self.clip_skip = clip_skip
        self.emphasis = emphasis
        self._cache: dict[str, Cond] = {}
        self.extra_network_tags: list = []

    def encode(self, text: str) -> Cond:
        if text not in self._cache:
            with torch.inference_mode():
                result = self.text.encode([text], clip_skip=self.clip_skip, emphasis=self.emphasis,
                                          embeddings=self.embeddings)
            self._cache[text] = Cond(result.cross_attn, getattr(result, "pooled", None))
        return self._cache[text]

    def _strip_tags(self, prompt: str) -> str:
        text, tags = prompt_parser.extract_extra_networks(prompt)
        self.extra_network_tags.extend(tags)
        return text

    def scheduled(self, prompt: str, steps: int, hires_steps: int | None = None) -> ScheduledCond:
        """Prompt editing and alternation: [(end_step, cond), ...].

        With `hires_steps` the schedule is the hires pass's (A1111: fractions span 1..2,
        whole numbers count on from the first pass's `steps`).
        """
        prompt = self._strip_tags(prompt)
        schedule = prompt_parser.get_learned_conditioning_prompt_schedules([prompt], steps, hires_steps)[0]
        return [(end_step, self.encode(text)) for end_step, text in schedule]

    def composable(self, prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[ScheduledCond, float]]:
        """`AND`-separated sub-prompts, each with its own schedule and weight."""
        return [(self.scheduled(part, steps, hires_steps), weight)
                for part, weight in prompt_parser.split_and(prompt)]

    def negative(self, prompt: str, steps: int, hires_steps: int | None = None) -> ScheduledCond:
        if self.zero_empty_negative and prompt == "":
            cond = self.encode("")
            zero = Cond(torch.zeros_like(cond.cross_attn),
                        torch.zeros_like(cond.pooled) if cond.pooled is not None else None)
            return [(hires_steps or steps, zero)]
        return self.scheduled(prompt, steps, hires_steps)

    def for_batch(self, prompts: Sequence[str], negative_prompts: Sequence[str], steps: int,
                  hires_steps: int | None = None):
        conds = [self.composable(p, steps, hires_steps) for p in prompts]
        unconds = [self.negative(n, steps, hires_steps) for n in negative_prompts]
        return conds, unconds
