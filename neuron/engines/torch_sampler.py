"""Sampling one sequence's next token from its logits: repetition, presence and frequency
penalties, then greedy or temperature / top-k / top-p sampling with the sequence's own seeded
generator."""

from __future__ import annotations

from typing import Final

import torch

from neuron.engines.base import GenerationParams

#: Temperatures below this sample greedily (dividing by them overflows float32).
_GREEDY_BELOW: Final = 1e-4
_LOGIT_LIMIT: Final = 3.0e38


class Sampler:
    """Turns logits into the next token for one generation (penalties, then greedy or sampled)."""

    def __init__(
        self, params: GenerationParams, device: torch.device, *, vocab_limit: int | None = None
    ) -> None:
        """Create a sampler; seeded when ``params.seed`` is set.

        Args:
            params: sampling parameters.
            device: where the logits live.
            vocab_limit: ids from here on are never sampled (embedding rows padded past the
                tokenizer's vocabulary, as in Qwen checkpoints).
        """
        self.params = params
        self._vocab_limit = vocab_limit
        self._generator = torch.Generator(device=device)
        if params.seed is not None:
            self._generator.manual_seed(params.seed)
        else:
            self._generator.seed()
        self._history: list[int] = []
        self._counts: dict[int, int] = {}
        for token_id in params.history:
            self.record(token_id)

    def record(self, token_id: int) -> None:
        """Note a generated token (for the penalties)."""
        self._history.append(token_id)
        self._counts[token_id] = self._counts.get(token_id, 0) + 1

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor) -> int:
        """Pick the next token from float32 ``logits`` (``[vocab]``); may modify them."""
        params = self.params
        if self._vocab_limit is not None and self._vocab_limit < logits.shape[-1]:
            logits[self._vocab_limit :] = float("-inf")
        if self._history:
            self._apply_penalties(logits)
        # Untrusted extremes (a penalty of 1e-30, a temperature of 1e-40) must not reach the
        # softmax as inf or NaN: near-zero temperatures are greedy, and scaled logits are
        # clamped to what float32 holds.
        if params.temperature <= _GREEDY_BELOW or not bool(torch.isfinite(logits).any()):
            return int(torch.argmax(torch.nan_to_num(logits, nan=float("-inf"))))
        logits = torch.nan_to_num(logits / params.temperature, nan=float("-inf"),
                                  posinf=_LOGIT_LIMIT, neginf=float("-inf"))
        vocab = logits.shape[-1]
        if 0 < params.top_k < vocab:
            values, indices = torch.topk(logits, params.top_k)
        elif params.top_p < 1.0:
            values, indices = torch.sort(logits, descending=True)
        else:
            probs = torch.softmax(logits, dim=-1)
            return int(torch.multinomial(probs, 1, generator=self._generator))
        if params.top_p < 1.0:
            probs = torch.softmax(values, dim=-1)
            keep = (torch.cumsum(probs, dim=-1) - probs) < params.top_p
            keep[0] = True  # the most likely token always stays
            values, indices = values[keep], indices[keep]
        choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=self._generator)
        return int(indices[choice])

    def _apply_penalties(self, logits: torch.Tensor) -> None:
        params = self.params
        device = logits.device
        if params.repetition_penalty != 1.0 and params.repetition_window > 0:
            window = sorted(set(self._history[-params.repetition_window :]))
            ids = torch.tensor(window, device=device)
            scores = logits[ids]
            logits[ids] = torch.where(
                scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty
            )
        if params.presence_penalty or params.frequency_penalty:
            ids = torch.tensor(list(self._counts), device=device)
            counts = torch.tensor(list(self._counts.values()), device=device, dtype=logits.dtype)
            logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
