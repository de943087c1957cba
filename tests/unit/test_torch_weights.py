"""Loading the tiny model from safetensors and from GGUF: same weights, same logits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from neuron.engines import torch_weights
from neuron.engines.torch_decoder import DecoderModel
from neuron.engines.torch_engine import TorchEngine, TorchModel
from neuron.engines.torch_weights import config_from_hf, unpermute_rope_rows
from neuron.errors import ModelLoadError, UnsupportedArchitectureError
from tests.support.tiny_models import TinyModel, build_tiny_llama, llama_permute

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _ignore(fraction: float, what: str) -> None:
    pass


def load(files_model: TinyModel, fmt: str, dtype: str = "float32") -> TorchModel:
    engine = TorchEngine(dtype=dtype)
    files = files_model.gguf_files() if fmt == "gguf" else files_model.safetensors_files()
    return engine.load(files, _ignore)


def all_logits(model: DecoderModel, ids: list[int]) -> torch.Tensor:
    cache = model.new_cache(len(ids))
    with torch.inference_mode():
        logits: torch.Tensor = model(torch.tensor(ids), [cache], [len(ids)], all_logits=True)
    return logits


def greedy(model: TorchModel, ids: list[int], n: int = 24) -> list[int]:
    import threading

    from neuron.engines.base import GenerationParams, Step

    steps = model.generate(ids, GenerationParams(max_tokens=n, temperature=0), threading.Event())
    return [s.token_id for s in steps if isinstance(s, Step)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-tied"), seed=3, tie_embeddings=True)


@pytest.mark.parametrize("which", ["tiny", "tiny_tied"])
def test_safetensors_and_gguf_give_the_same_logits_and_greedy_tokens(
    which: str, request: pytest.FixtureRequest
) -> None:
    model: TinyModel = request.getfixturevalue(which)
    dense, quant = load(model, "safetensors"), load(model, "gguf")
    ids = dense.encode(PROMPT)
    assert quant.encode(PROMPT) == ids
    dense_logits = all_logits(dense.decoder, ids)
    gguf_logits = all_logits(quant.decoder, ids)
    torch.testing.assert_close(gguf_logits, dense_logits, rtol=0, atol=1e-5)
    tokens = greedy(dense, ids)
    if which == "tiny":  # untied: a varied continuation, so equality means something
        assert len(set(tokens)) > 5
    assert greedy(quant, ids) == tokens


def test_gguf_without_unpermute_would_differ(
    tiny: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GGUF really is stored permuted: skipping the un-permute changes the logits."""
    reference = all_logits(
        load(tiny, "safetensors").decoder, load(tiny, "safetensors").encode(PROMPT)
    )
    monkeypatch.setattr(torch_weights, "unpermute_rope_rows", lambda w, n: w)
    broken = load(tiny, "gguf")
    assert not torch.allclose(
        all_logits(broken.decoder, broken.encode(PROMPT)), reference, atol=1e-2
    )


def test_tied_gguf_has_no_output_tensor_and_shares_the_embedding(tiny_tied: TinyModel) -> None:
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(tiny_tied.gguf_path)).tensors}
    assert "output.weight" not in names
    decoder = load(tiny_tied, "gguf").decoder
    assert decoder.lm_head.weight is decoder.embed_tokens.weight


def test_unpermute_inverts_llama_cpp_permute() -> None:
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        permuted = torch.from_numpy(llama_permute(weight, heads).copy())
        assert np.array_equal(unpermute_rope_rows(permuted, heads).numpy(), weight)
    assert not np.array_equal(llama_permute(weight, 2), weight)


def test_quantised_gguf_loads_in_small_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_llama(tmp_path, gguf_tensor_type="Q8_0")
    monkeypatch.setattr(torch_weights, "_DEQUANT_BLOCK_ELEMENTS", 100)  # many blocks per tensor
    quant, dense = load(model, "gguf"), load(model, "safetensors")
    ids = dense.encode(PROMPT)
    q8, f32 = all_logits(quant.decoder, ids), all_logits(dense.decoder, ids)
    assert not torch.equal(q8, f32)  # really quantised
    assert (q8 - f32).abs().max() < 0.05 * f32.abs().max()
    assert (q8.argmax(-1) == f32.argmax(-1)).float().mean() > 0.8


def test_f16_gguf_matches_closely(tmp_path: Path) -> None:
    model = build_tiny_llama(tmp_path, gguf_tensor_type="F16")
    half, dense = load(model, "gguf"), load(model, "safetensors")
    ids = dense.encode(PROMPT)
    torch.testing.assert_close(
        all_logits(half.decoder, ids), all_logits(dense.decoder, ids), rtol=0.01, atol=0.02
    )


def test_missing_tensor_is_a_load_error(tiny: TinyModel, tmp_path: Path) -> None:
    weights = load_file(str(tiny.folder / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path))
    files = tiny.safetensors_files()
    with pytest.raises(ModelLoadError, match=r"missing: layers\.1\.mlp\.up_proj\.weight"):
        TorchEngine().load(replace(files, weights=(path,)), _ignore)


def test_unexpected_or_misshapen_tensors_are_load_errors(tiny: TinyModel, tmp_path: Path) -> None:
    files = tiny.safetensors_files()
    weights = load_file(str(tiny.folder / "model.safetensors"))
    for name, change in (
        ("model.layers.0.mlp.gate_proj.bias", np.zeros(128, np.float32)),
        ("model.norm.weight", np.zeros(3, np.float32)),
    ):
        path = tmp_path / f"{name}.safetensors"
        save_file({**weights, name: change}, str(path))
        with pytest.raises(ModelLoadError, match=r"unexpected tensor|has shape"):
            TorchEngine().load(replace(files, weights=(path,)), _ignore)


def test_sharded_safetensors_load_like_one_file(tiny: TinyModel, tmp_path: Path) -> None:
    weights = load_file(str(tiny.folder / "model.safetensors"))
    names = sorted(weights)
    shards = (tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    save_file({n: weights[n] for n in names[::2]}, str(shards[0]))
    save_file({n: weights[n] for n in names[1::2]}, str(shards[1]))
    files = tiny.safetensors_files()
    sharded = TorchEngine(dtype="float32").load(replace(files, weights=shards), _ignore)
    whole = load(tiny, "safetensors")
    ids = whole.encode(PROMPT)
    assert torch.equal(all_logits(sharded.decoder, ids), all_logits(whole.decoder, ids))


def _config(tiny: TinyModel, **changes: object) -> dict[str, object]:
    config: dict[str, object] = json.loads((tiny.folder / "config.json").read_text())
    config.update(changes)
    return config


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"mlp_bias": True}, "mlp_bias"),
        (
            {"architectures": ["MistralForCausalLM"], "sliding_window": 16},
            "sliding-window",
        ),
        ({"num_key_value_heads": 3}, "multiple"),
    ],
)
def test_unsupported_configs_are_refused(
    tiny: TinyModel, changes: dict[str, object], match: str
) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=match):
        config_from_hf(_config(tiny, **changes))


def test_qwen_configs_enable_biases_and_qk_norm(tiny: TinyModel) -> None:
    qwen2 = config_from_hf(
        _config(
            tiny, architectures=["Qwen2ForCausalLM"], use_sliding_window=False, sliding_window=4
        )
    )
    assert (qwen2.architecture, qwen2.attention_bias, qwen2.qk_norm) == ("qwen2", True, False)
    qwen3 = config_from_hf(_config(tiny, architectures=["Qwen3ForCausalLM"], head_dim=32))
    assert (qwen3.architecture, qwen3.attention_bias, qwen3.qk_norm) == ("qwen3", False, True)
    assert qwen3.head_dim == 32
    llama3 = config_from_hf(
        _config(
            tiny,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    )
    assert llama3.rope_scaling is not None and llama3.rope_scaling.kind == "llama3"


def test_config_with_wrong_types_is_a_load_error(tiny: TinyModel) -> None:
    with pytest.raises(ModelLoadError, match="hidden_size"):
        config_from_hf(_config(tiny, hidden_size="64"))
