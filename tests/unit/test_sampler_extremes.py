"""Untrusted extremes never become a 5xx: sampling values that would reach the softmax as inf or
NaN, and JSON nested deeper than the decoder can follow."""

from __future__ import annotations

import pytest
import torch

from neuron.engines.base import GenerationParams
from neuron.engines.torch_sampler import Sampler

CPU = torch.device("cpu")


def _logits() -> torch.Tensor:
    return torch.tensor([1.0, 3.0, -2.0, 0.5])


def test_a_vanishing_temperature_samples_greedily() -> None:
    sampler = Sampler(GenerationParams(max_tokens=1, temperature=1e-40, seed=0), CPU)
    assert sampler.sample(_logits()) == 1


@pytest.mark.parametrize("penalty", [1e-30, 1e30])
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (2, 1.0), (0, 0.5)])
def test_extreme_penalties_still_give_a_token(penalty: float, top_k: int, top_p: float) -> None:
    params = GenerationParams(max_tokens=1, temperature=0.7, seed=0, top_k=top_k, top_p=top_p,
                              repetition_penalty=penalty, presence_penalty=penalty,
                              frequency_penalty=penalty)
    sampler = Sampler(params, CPU)
    for token in (0, 1, 3):
        sampler.record(token)
    assert sampler.sample(_logits() * 1e30) in range(4)


def test_nan_logits_do_not_raise() -> None:
    sampler = Sampler(GenerationParams(max_tokens=1, temperature=1.0, seed=0), CPU)
    logits = torch.tensor([float("nan"), 2.0, float("nan"), 1.0])
    assert sampler.sample(logits) in (1, 3)
    assert Sampler(GenerationParams(max_tokens=1, temperature=1.0), CPU).sample(
        torch.full((4,), float("nan"))) in range(4)


def test_deeply_nested_json_is_a_client_error() -> None:
    import msgspec

    from cortex.errors import ApiError, Reason
    from cortex.http import decode_body

    body = b'{"model": "m", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(ApiError) as refused:
        decode_body(body, msgspec.json.Decoder(dict[str, object]))
    assert refused.value.reason is Reason.INVALID_REQUEST
    assert refused.value.spec.status == 400
