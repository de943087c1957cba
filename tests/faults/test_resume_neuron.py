"""A neuron continues a generation from any number of delivered tokens (`JobRequest.resume`) over
the real bus, on the torch engine with a tiny model: what the first attempt would have delivered
plus what the continuation sends is the uninterrupted greedy answer, with the same finish reason
and usage (completion tokens counting the resumed ones), also when a stop string spans the
resumption point or the delivered tokens already ended the generation."""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from bus_schema.messages import (
    ChatMessage,
    JobAccepted,
    JobFailed,
    JobFinished,
    JobRequest,
    ResumeState,
    SamplingParams,
    TokenChunk,
)
from cortex.bus import GatewayBus, Keepalive
from cortex.fleet import FleetView
from cortex.settings import GatewaySettings
from neuron.engines.base import GenerationParams, Step
from neuron.engines.torch_engine import Quantize, TorchEngine, TorchModel
from neuron.output_router import OutputRouter, ReasoningPiece, TextPiece
from neuron.settings import ModelSpec, NeuronSettings
from neuron.text.detokenize import IncrementalDetokenizer, StopMatcher
from tests.support.background_worker import BackgroundWorker
from tests.support.tiny_models import TinyModel

pytestmark = pytest.mark.integration
MODEL = "tiny/resume"
MESSAGES = (ChatMessage(role="user", content="What is the capital of France?"),)
MAX_TOKENS = 40


def _engine(weights: Quantize) -> TorchEngine:
    # float32 activations, with float32 weights or the CPU default's float16 ones (whose rows do
    # not depend on how many share a matrix product): prefill and decode agree, so greedy
    # continuations are exact. (bf16 activations or int8 weights round them differently.)
    return TorchEngine(device="cpu", dtype="float32", quantize=weights)


@pytest.fixture(scope="module", params=["none", "fp16"])
def weights(request: pytest.FixtureRequest) -> Quantize:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def model(tiny_model: TinyModel, weights: Quantize) -> Iterator[TorchModel]:
    loaded = _engine(weights).load(tiny_model.safetensors_files(),
                                   lambda fraction, message: None)
    yield loaded
    loaded.close()


#: The neuron's repetition penalty: none, or a strong one (its window must count the delivered
#: tokens as generated, or the continuation picks other tokens).
PENALTY = pytest.mark.parametrize("penalty", [1.0, 1.5], indirect=True)


@pytest.fixture
def penalty(request: pytest.FixtureRequest) -> float:
    return float(getattr(request, "param", 1.0))


@pytest.fixture
def neuron(nats_url: str, subject_root: str, tiny_model: TinyModel, weights: Quantize,
           penalty: float) -> Iterator[BackgroundWorker]:
    with BackgroundWorker(
        name="resumer", nats_url=nats_url, root=subject_root, engine=_engine(weights),
        models=[ModelSpec(source=str(tiny_model.folder), served_name=MODEL)],
        settings=NeuronSettings(default_repetition_penalty=penalty),
    ) as worker:
        yield worker


@pytest.fixture
async def bus(nats_url: str, subject_root: str,
              neuron: BackgroundWorker) -> AsyncIterator[GatewayBus]:
    gateway = GatewayBus(GatewaySettings(nats_url=nats_url, root=subject_root), FleetView())
    await gateway.start()
    yield gateway
    await gateway.close()


@dataclass
class Answer:
    text: str = ""
    reasoning: str = ""
    finish: JobFinished | None = None
    accepted: JobAccepted | None = None
    ids: list[int] = field(default_factory=list)


def _greedy(model: TorchModel, stop: tuple[str, ...],
            penalty: float = 1.0) -> tuple[list[int], int]:
    """The uninterrupted greedy ids (up to a stop string) and the prompt's size."""
    prompt = model.encode(model.render_chat([{"role": m.role, "content": m.content}
                                              for m in MESSAGES]))
    params = GenerationParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=stop,
                              repetition_penalty=penalty,
                              repetition_window=NeuronSettings().repetition_window)
    ids = [item.token_id for item in model.generate(prompt, params, threading.Event())
           if isinstance(item, Step)]
    return ids, len(prompt)


def _released(model: TorchModel, ids: Sequence[int]) -> list[str]:
    """The text each token releases from the detokenizer."""
    detokenizer = IncrementalDetokenizer(model.tokenizer.decode)
    return [detokenizer.push(token_id) for token_id in ids]


def _delivered(model: TorchModel, ids: Sequence[int], stop: tuple[str, ...]) -> tuple[str, str]:
    """What a neuron has sent for ``ids`` before the generation ends (text, reasoning)."""
    stopper = StopMatcher(stop)
    router = OutputRouter(parse_tools=False)
    text, reasoning = [], []
    for released in _released(model, ids):
        passed, _ = stopper.push(released)
        for piece in router.push(passed) if passed else []:
            if isinstance(piece, TextPiece):
                text.append(piece.text)
            elif isinstance(piece, ReasoningPiece):
                reasoning.append(piece.text)
    return "".join(text), "".join(reasoning)


async def _run(bus: GatewayBus, stop: tuple[str, ...], resume: Sequence[int] | None) -> Answer:
    job_id = uuid.uuid4().hex
    job = JobRequest(
        job_id=job_id, model=MODEL, messages=MESSAGES,
        params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=stop),
        resume=None if resume is None else ResumeState(token_ids=tuple(resume),
                                                       resumed_from=job_id),
    )
    stream = await bus.submit(job)
    answer = Answer()
    first = await stream.first(30)
    assert isinstance(first, JobAccepted), first
    answer.accepted = first
    try:
        async for events in stream.events():
            assert not isinstance(events, Keepalive)
            for event in events:
                assert not isinstance(event, JobFailed | JobAccepted), event
                if isinstance(event, TokenChunk):
                    answer.text += event.text
                    answer.reasoning += event.reasoning
                    answer.ids.extend(event.token_ids)
                elif isinstance(event, JobFinished):
                    answer.finish = event
    finally:
        stream.close()
    return answer


async def _check_every_resumption(bus: GatewayBus, model: TorchModel,
                                  stop: tuple[str, ...], penalty: float = 1.0) -> list[int]:
    ids, prompt_tokens = _greedy(model, stop, penalty)
    whole = await _run(bus, stop, None)
    assert whole.finish is not None and whole.accepted is not None
    assert whole.ids == ids[:len(whole.ids)]
    assert whole.finish.usage.completion_tokens == len(ids)
    for k in range(len(ids) + 1):
        sent_text, sent_reasoning = _delivered(model, ids[:k], stop)
        rest = await _run(bus, stop, ids[:k])
        assert rest.accepted is not None and rest.finish is not None
        assert (rest.accepted.resumed_tokens, rest.accepted.prompt_tokens) == (k, prompt_tokens)
        assert rest.accepted.max_tokens == whole.accepted.max_tokens
        assert (sent_text + rest.text, sent_reasoning + rest.reasoning) == (
            whole.text, whole.reasoning), f"resumed after {k} tokens"
        assert (rest.finish.finish_reason, rest.finish.stop_sequence, rest.finish.usage) == (
            whole.finish.finish_reason, whole.finish.stop_sequence, whole.finish.usage), k
        assert rest.ids == ids[k:k + len(rest.ids)]  # only new tokens are sent
    return ids


@PENALTY
async def test_resuming_at_every_token_continues_the_greedy_answer(
    bus: GatewayBus, model: TorchModel, penalty: float,
) -> None:
    ids = await _check_every_resumption(bus, model, (), penalty)
    assert len(ids) == MAX_TOKENS  # the last case: every token delivered, nothing left to do


async def test_a_stop_string_across_the_resumption_point_still_ends_the_answer(
    bus: GatewayBus, model: TorchModel
) -> None:
    ids, _ = _greedy(model, ())
    released = _released(model, ids)

    def spanning(i: int) -> str:
        return released[i][-2:] + released[i + 1][:2]

    def first_at(i: int) -> bool:
        return "".join(released[:i + 2]).find(spanning(i)) == len("".join(released[:i + 1])) - 2

    # A stop string made of the end of one token's text and the start of the next one's, late
    # in the answer and found nowhere before: the token before it is held back, not sent.
    cut = next(i for i in range(len(ids) - 2, 0, -1)
               if len(released[i]) >= 2 and len(released[i + 1]) >= 2
               and "\ufffd" not in spanning(i) and first_at(i))
    stopped = await _check_every_resumption(bus, model, (spanning(cut),))
    assert len(stopped) == cut + 2  # it ended on the token that completed the stop string
