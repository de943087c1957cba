"""The torch engine: our own decoder (`torch_decoder`) behind the `Engine` interface.

`TorchEngine.load` reads config, tokenizer, chat template and weights (safetensors or GGUF) and
returns a `TorchModel`. ``TorchModel.generate`` prefills the prompt in chunks, then samples one
token per step with a per-sequence KV cache, streaming text through the incremental detokenizer
and the stop-string matcher. Everything here is blocking and compute-heavy: call it from the
model's own thread, never from an event loop.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

import torch

from neuron.chat_template import ChatTemplate
from neuron.detokenize import IncrementalDetokenizer, StopMatcher
from neuron.engines.base import (
    Finish,
    FinishReason,
    GenerationParams,
    ModelFiles,
    ModelInfo,
    ProgressCallback,
    Step,
    TemplateMessage,
    TemplateValue,
)
from neuron.engines.torch_decoder import DecoderModel, KVCache
from neuron.engines.torch_weights import (
    GGUFFile,
    config_from_gguf,
    config_from_hf,
    load_gguf,
    load_safetensors,
)
from neuron.errors import ChatTemplateError, ModelLoadError, ModelNotLoadedError
from neuron.tokenizer import Tokenizer, gguf_value

logger = logging.getLogger(__name__)

_DTYPES: Final = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
# Share of the progress bar spent before the weights (config, tokenizer, template).
_PREPARE_SHARE: Final = 0.05
#: Reads a prepared model's weights, reporting progress in [0, 1].
_WeightsLoader = Callable[[ProgressCallback], DecoderModel]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a settings string (``auto``: bf16, or fp16 on GPUs without bf16).

    Raises:
        ValueError: an unknown name.
    """
    if dtype == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32"
        ) from None


def _read_json(path: Path | None) -> dict[str, object] | None:
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return value


class TorchEngine:
    """Loads Llama / SmolLM / Qwen2 / Qwen3 models into our torch decoder."""

    name = "torch"

    def __init__(
        self,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        prefill_chunk_tokens: int = 512,
        use_chat_template: bool = True,
    ) -> None:
        """Configure the engine.

        Args:
            device: ``cpu`` or ``cuda:N``.
            dtype: ``auto`` (bf16; fp16 on GPUs without bf16), ``bfloat16``, ``float16`` or
                ``float32``.
            prefill_chunk_tokens: prompt tokens per forward pass while prefilling.
            use_chat_template: false forces the ChatML template (``NEURON_USE_CHAT_TEMPLATE``).

        Raises:
            ValueError: an unknown device or dtype, or a non-positive chunk size.
        """
        if prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be positive")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.use_chat_template = use_chat_template

    def load(self, files: ModelFiles, progress: ProgressCallback) -> TorchModel:
        """Load a model's tokenizer, chat template and weights; blocking.

        Raises:
            UnsupportedArchitectureError: the architecture, a feature or the GGUF vocabulary is
                not supported (raised before any weights are read).
            ModelLoadError: files missing or malformed, or the device is unavailable.
        """
        started = time.perf_counter()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {self.device} requested but CUDA is not available")
        progress(0.0, "reading configuration")
        tokenizer_config = _read_json(files.tokenizer_config)
        generation_config = _read_json(files.generation_config)

        def weights_progress(fraction: float, what: str) -> None:
            progress(_PREPARE_SHARE + (1 - _PREPARE_SHARE) * fraction, what)

        # Everything cheap (and every refusal) first, the weights last.
        if files.format == "gguf":
            prepared = self._prepare_gguf(files, tokenizer_config, generation_config)
        else:
            prepared = self._prepare_safetensors(files, tokenizer_config, generation_config)
        tokenizer, gguf_template, load_weights = prepared
        template = self._chat_template(files, tokenizer_config, gguf_template, tokenizer)
        model = load_weights(weights_progress)
        info = _model_info(files, model, self.device, self.dtype)
        logger.info(
            "loaded %s (%s, %s, %.1fM parameters, %.0f MiB, %s on %s) in %.2f s",
            files.model_id,
            files.format,
            info.architecture,
            info.parameters / 1e6,
            info.memory_bytes / 2**20,
            info.dtype,
            info.device,
            time.perf_counter() - started,
        )
        progress(1.0, "ready")
        return TorchModel(
            model=model,
            tokenizer=tokenizer,
            template=template,
            info=info,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
        )

    def _prepare_safetensors(
        self,
        files: ModelFiles,
        tokenizer_config: Mapping[str, object] | None,
        generation_config: Mapping[str, object] | None,
    ) -> tuple[Tokenizer, str | None, _WeightsLoader]:
        model_config = _read_json(files.config)
        if model_config is None:
            raise ModelLoadError(f"{files.model_id}: config.json is required for safetensors")
        if files.tokenizer is None:
            raise ModelLoadError(f"{files.model_id}: tokenizer.json is required for safetensors")
        if not files.weights:
            raise ModelLoadError(f"{files.model_id}: no safetensors shards")
        config = config_from_hf(model_config)
        tokenizer = Tokenizer.from_tokenizer_json(
            files.tokenizer,
            tokenizer_config=tokenizer_config,
            generation_config=generation_config,
            model_config=model_config,
        )

        def load_weights(progress: ProgressCallback) -> DecoderModel:
            return load_safetensors(
                config, files.weights, device=self.device, dtype=self.dtype, progress=progress
            )

        return tokenizer, None, load_weights

    def _prepare_gguf(
        self,
        files: ModelFiles,
        tokenizer_config: Mapping[str, object] | None,
        generation_config: Mapping[str, object] | None,
    ) -> tuple[Tokenizer, str | None, _WeightsLoader]:
        if len(files.weights) != 1:
            raise ModelLoadError(f"{files.model_id}: expected exactly one .gguf file")
        reader = _open_gguf(files.weights[0])
        config = config_from_gguf(reader, frozenset(t.name for t in reader.tensors))
        if files.tokenizer is not None:
            tokenizer = Tokenizer.from_tokenizer_json(
                files.tokenizer,
                tokenizer_config=tokenizer_config,
                generation_config=generation_config,
            )
        else:
            tokenizer = Tokenizer.from_gguf_metadata(
                reader, tokenizer_config=tokenizer_config, generation_config=generation_config
            )
        template = gguf_value(reader, "tokenizer.chat_template")
        # The tensors only need the file's memory map; dropping the reader frees its parsed
        # metadata (the whole vocabulary as small arrays) before the weights are built.
        tensors = list(reader.tensors)
        del reader

        def load_weights(progress: ProgressCallback) -> DecoderModel:
            return load_gguf(
                tensors, config, device=self.device, dtype=self.dtype, progress=progress
            )

        return tokenizer, template if isinstance(template, str) else None, load_weights

    def _chat_template(
        self,
        files: ModelFiles,
        tokenizer_config: Mapping[str, object] | None,
        gguf_template: str | None,
        tokenizer: Tokenizer,
    ) -> ChatTemplate:
        try:
            if not self.use_chat_template:
                return ChatTemplate.chatml(tokenizer.special_tokens)
            template = ChatTemplate.resolve(
                chat_template_file=files.chat_template,
                tokenizer_config=tokenizer_config,
                gguf_template=gguf_template,
                special_tokens=tokenizer.special_tokens,
            )
        except ChatTemplateError as exc:
            raise ModelLoadError(f"{files.model_id}: {exc}") from exc
        logger.debug("%s: chat template from %s", files.model_id, template.origin)
        return template


def _open_gguf(path: Path) -> GGUFFile:
    from gguf import GGUFReader

    try:
        reader: GGUFFile = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    return reader


def _model_info(
    files: ModelFiles, model: DecoderModel, device: torch.device, dtype: torch.dtype
) -> ModelInfo:
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights count once
    config = model.config
    return ModelInfo(
        model_id=files.model_id,
        engine=TorchEngine.name,
        format=files.format,
        architecture=config.architecture,
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        parameters=sum(p.numel() for p in unique),
        memory_bytes=sum(p.numel() * p.element_size() for p in unique),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )


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
        if params.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits / params.temperature
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


class TorchModel:
    """A model resident on a device (the `LoadedModel` of the torch engine)."""

    def __init__(
        self,
        *,
        model: DecoderModel,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        info: ModelInfo,
        prefill_chunk_tokens: int = 512,
    ) -> None:
        """Wrap loaded parts; use `TorchEngine.load` to build one."""
        self._model: DecoderModel | None = model
        self.tokenizer = tokenizer
        self.chat_template = template
        self._chatml = ChatTemplate.chatml(tokenizer.special_tokens)
        self._info = info
        self.prefill_chunk_tokens = prefill_chunk_tokens

    @property
    def info(self) -> ModelInfo:
        """Facts about the model."""
        return self._info

    @property
    def decoder(self) -> DecoderModel:
        """The torch module (for diagnostics and tests).

        Raises:
            ModelNotLoadedError: after `close`.
        """
        if self._model is None:
            raise ModelNotLoadedError(self._info.model_id)
        return self._model

    def render_chat(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
        template_kwargs: Mapping[str, TemplateValue] | None = None,
    ) -> str:
        """Render the chat template with ``add_generation_prompt=True``.

        A template that fails without tools falls back to ChatML (REFERENCE §6.4); with tools
        the error is raised, since ChatML would silently drop them.

        Raises:
            ChatTemplateError: the template failed and tools were present (or ChatML failed too).
        """
        try:
            return self.chat_template.render(messages, tools=tools, template_kwargs=template_kwargs)
        except ChatTemplateError as exc:
            if tools or self.chat_template.origin == "chatml":
                raise
            logger.warning("%s; falling back to ChatML", exc)
            return self._chatml.render(messages, template_kwargs=template_kwargs)

    def encode(self, text: str) -> list[int]:
        """Tokenise rendered text without adding special tokens."""
        return self.tokenizer.encode(text)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        cancelled: threading.Event,
    ) -> Iterator[Step | Finish]:
        """Generate from ``prompt_ids``; see `LoadedModel.generate`.

        Raises:
            ValueError: an empty prompt, or ids outside the vocabulary.
            ModelNotLoadedError: after `close`.
        """
        model = self.decoder
        vocab = model.config.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt ids must be in [0, {vocab})")
        return self._generate(model, list(prompt_ids), params, cancelled)

    def _generate(
        self,
        model: DecoderModel,
        prompt: list[int],
        params: GenerationParams,
        cancelled: threading.Event,
    ) -> Iterator[Step | Finish]:
        started = time.perf_counter()
        budget = min(params.max_tokens, model.config.context_length - len(prompt))
        if budget <= 0:
            yield Finish(reason="length", completion_tokens=0)
            return
        device = model.embed_tokens.weight.device
        cache = model.new_cache(len(prompt) + budget)
        ids = torch.tensor(prompt, dtype=torch.long, device=device)
        logits: torch.Tensor | None = None
        for start in range(0, len(prompt), self.prefill_chunk_tokens):
            if cancelled.is_set():
                yield Finish(
                    reason="cancelled",
                    completion_tokens=0,
                    prefill_seconds=time.perf_counter() - started,
                )
                return
            chunk = ids[start : start + self.prefill_chunk_tokens]
            logits = _forward(model, chunk, cache)
        assert logits is not None
        prefilled = time.perf_counter()

        sampler = Sampler(params, device, vocab_limit=self.tokenizer.vocab_size)
        detokenizer = IncrementalDetokenizer(self.tokenizer.decode)
        stopper = StopMatcher(params.stop)
        stop_ids = self.tokenizer.stop_ids
        generated = 0
        reason: FinishReason = "length"
        while True:
            if cancelled.is_set():
                reason = "cancelled"
                break
            token = sampler.sample(logits[0])
            if token in stop_ids:
                reason = "stop"
                break
            generated += 1
            sampler.record(token)
            text, matched = stopper.push(detokenizer.push(token))
            yield Step(token, text)
            if matched is not None:
                yield Finish(
                    reason="stop",
                    completion_tokens=generated,
                    stop_sequence=matched,
                    prefill_seconds=prefilled - started,
                    decode_seconds=time.perf_counter() - prefilled,
                )
                return
            if generated >= budget:
                break
            logits = _forward(model, torch.tensor([token], device=device), cache)

        tail, matched = stopper.push(detokenizer.flush())
        if matched is None:
            tail += stopper.flush()
        yield Finish(
            reason="stop" if matched is not None else reason,
            completion_tokens=generated,
            text=tail,
            stop_sequence=matched,
            prefill_seconds=prefilled - started,
            decode_seconds=time.perf_counter() - prefilled,
        )

    def close(self) -> None:
        """Drop the weights and release device memory."""
        device = self._model.embed_tokens.weight.device if self._model is not None else None
        self._model = None
        gc.collect()
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()


@torch.inference_mode()
def _forward(model: DecoderModel, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    logits: torch.Tensor = model(input_ids, [cache], [input_ids.shape[0]])
    return logits
