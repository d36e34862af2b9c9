"""Model providers: Hugging Face config.json -> ModelArchitecture -> Megatron-Core GPTModel.

Everything here uses real objects: real-looking config.json dicts (copied from the published
checkpoints), real `transformers` models for parameter counts and rotary frequencies, and real
Megatron-Core GPTModels built in a single-process (TP1/PP1) world on the CPU.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

import transformers  # noqa: E402
from transformers import LlamaConfig, Qwen2Config  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding  # noqa: E402

from rift_megatron.models import (  # noqa: E402
    FAMILIES,
    GPTModelProvider,
    ModelConfigError,
    PrecisionConfig,
    build_transformer_config,
    load_hf_config,
    padded_vocab_size,
    parse_hf_config,
)
from rift_megatron.models.hf_config import RopeScaling  # noqa: E402
from rift_megatron.models.presets import tiny_hf_config  # noqa: E402
from rift_megatron.models.provider import layer_spec, validate_layout  # noqa: E402
from rift_megatron.parallel import (  # noqa: E402
    ParallelConfigError,
    ParallelLayout,
    destroy_model_parallel,
    init_distributed,
    init_model_parallel,
)
from rift_megatron.platform import Platform, current_platform  # noqa: E402

# --------------------------------------------------------------------------------------------
# config.json files of published checkpoints (verbatim apart from omitted irrelevant keys)
# --------------------------------------------------------------------------------------------

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    # no "rope_theta": the original Llama 2 config relies on the 10000 default
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}

MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.42.0.dev0",
    "use_cache": True,
    "vocab_size": 32768,
}

# What transformers 5 writes: rope base and scaling live in `rope_parameters`, no top-level
# rope_theta / rope_scaling, and "dtype" instead of "torch_dtype".
LLAMA31_8B_TRANSFORMERS5 = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "dtype": "bfloat16",
    "eos_token_id": 128001,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "transformers_version": "5.0.0",
    "use_cache": True,
    "vocab_size": 128256,
}

# Published parameter counts (safetensors metadata of the Hub checkpoints).
REAL_CONFIGS = {
    # name: (config, heads, kv, head_dim, qkv_bias, tied, rope_theta, rope_scaling, window, params)
    "llama-2-7b": (LLAMA2_7B, 32, 32, 128, False, False, 10000.0, None, None, 6_738_415_616),
    "llama-3.1-8b": (
        LLAMA31_8B, 32, 8, 128, False, False, 500000.0,
        RopeScaling(8.0, 1.0, 4.0, 8192), None, 8_030_261_248,
    ),
    "llama-3.2-1b": (
        LLAMA32_1B, 32, 8, 64, False, True, 500000.0,
        RopeScaling(32.0, 1.0, 4.0, 8192), None, 1_235_814_400,
    ),
    "qwen2.5-0.5b": (QWEN25_05B, 14, 2, 64, True, True, 1000000.0, None, None, 494_032_768),
    "mistral-7b-v0.1": (MISTRAL_7B_V01, 32, 8, 128, False, False, 10000.0, None, 4096, 7_241_732_096),
    "mistral-7b-v0.3": (MISTRAL_7B_V03, 32, 8, 128, False, False, 1000000.0, None, None, 7_248_023_552),
    "llama-3.1-8b-transformers5": (
        LLAMA31_8B_TRANSFORMERS5, 32, 8, 128, False, False, 500000.0,
        RopeScaling(8.0, 1.0, 4.0, 8192), None, 8_030_261_248,
    ),
}


def hf_parameter_count(config: dict) -> int:
    """Parameters of the transformers model for `config` (a shared tied tensor counts once)."""
    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def shrink(config: dict) -> dict:
    """The same config.json with tiny sizes (keeps architecture, GQA ratio, tie/bias/rope keys)."""
    small = copy.deepcopy(config)
    ratio = config["num_attention_heads"] // config.get("num_key_value_heads", config["num_attention_heads"])
    heads = 4 if ratio <= 4 else ratio
    small.update(
        hidden_size=16 * heads,
        intermediate_size=96,
        num_hidden_layers=2,
        vocab_size=300,
        num_attention_heads=heads,
    )
    small["num_key_value_heads"] = small["num_attention_heads"] // ratio
    if "head_dim" in small:  # keep an explicit head_dim explicit, and != hidden / heads
        small["head_dim"] = 24
    return small


# --------------------------------------------------------------------------------------------
# 1. Parsing real configs and parameter counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_parse_real_configs(name):
    config, heads, kv, head_dim, qkv_bias, tied, theta, scaling, window, params = REAL_CONFIGS[name]
    arch = parse_hf_config(copy.deepcopy(config), source=f"{name}/config.json")

    assert arch.architecture == config["architectures"][0]
    assert arch.family is FAMILIES[arch.architecture]
    assert arch.family.hf_model_type == config["model_type"]
    assert (arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (heads, kv, head_dim)
    assert arch.kv_group_size == heads // kv
    assert arch.hidden_size == config["hidden_size"]
    assert arch.num_layers == config["num_hidden_layers"]
    assert arch.ffn_hidden_size == config["intermediate_size"]
    assert arch.vocab_size == config["vocab_size"]
    assert arch.max_position_embeddings == config["max_position_embeddings"]
    assert arch.rms_norm_eps == config["rms_norm_eps"]
    assert arch.qkv_bias is qkv_bias
    assert arch.tie_word_embeddings is tied
    assert arch.rope_theta == theta and isinstance(arch.rope_theta, float)
    assert arch.rope_scaling == scaling
    assert arch.sliding_window == window
    assert arch.torch_dtype == "bfloat16" or arch.torch_dtype == config.get("torch_dtype")
    assert arch.source == f"{name}/config.json"
    assert arch.num_parameters() == params


def test_qkv_bias_only_for_qwen2():
    for architecture, family in FAMILIES.items():
        arch = parse_hf_config(tiny_hf_config(architecture))
        assert arch.qkv_bias is (family.name == "qwen2"), architecture


def test_transformers5_config_written_by_transformers_itself():
    """`LlamaConfig(...).to_dict()` of the installed transformers parses to the same values."""
    hf = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
        architectures=["LlamaForCausalLM"],
    )
    written = json.loads(hf.to_json_string())
    assert "rope_theta" not in written and "rope_scaling" not in written  # really the v5 layout
    arch = parse_hf_config(written)
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert (arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (4, 2, 16)


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_num_parameters_matches_transformers_on_shrunk_real_config(name):
    small = shrink(REAL_CONFIGS[name][0])
    assert parse_hf_config(small).num_parameters() == hf_parameter_count(small)


TINY_VARIANTS = {
    "llama": tiny_hf_config("LlamaForCausalLM"),
    "llama-tied": tiny_hf_config("LlamaForCausalLM", tie_word_embeddings=True),
    "llama-mha": tiny_hf_config("LlamaForCausalLM", num_key_value_heads=4),
    "llama-head_dim": tiny_hf_config("LlamaForCausalLM", head_dim=48),
    "qwen2-bias": tiny_hf_config("Qwen2ForCausalLM"),
    "qwen2-bias-tied": tiny_hf_config("Qwen2ForCausalLM", tie_word_embeddings=True),
    "mistral": tiny_hf_config("MistralForCausalLM"),
    "mistral-tied": tiny_hf_config("MistralForCausalLM", tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_num_parameters_matches_transformers_tiny(name):
    config = TINY_VARIANTS[name]
    arch = parse_hf_config(config)
    assert arch.num_parameters() == hf_parameter_count(config)


# --------------------------------------------------------------------------------------------
# 2. Errors name the field
# --------------------------------------------------------------------------------------------


def _without(key):
    def edit(config):
        del config[key]
    return edit


def _set(**fields):
    def edit(config):
        config.update(fields)
    return edit


BAD_CONFIGS = {
    "no-architectures": (_without("architectures"), ["'architectures'"]),
    "empty-architectures": (_set(architectures=[]), ["'architectures'"]),
    "gpt2": (
        _set(architectures=["GPT2LMHeadModel"]),
        ["'GPT2LMHeadModel' is not supported", *sorted(FAMILIES)],
    ),
    "no-hidden_size": (_without("hidden_size"), ["'hidden_size'", "missing"]),
    "no-num_attention_heads": (_without("num_attention_heads"), ["'num_attention_heads'", "missing"]),
    "no-num_hidden_layers": (_without("num_hidden_layers"), ["'num_hidden_layers'", "missing"]),
    "no-intermediate_size": (_without("intermediate_size"), ["'intermediate_size'", "missing"]),
    "no-vocab_size": (_without("vocab_size"), ["'vocab_size'", "missing"]),
    "no-max_position_embeddings": (
        _without("max_position_embeddings"), ["'max_position_embeddings'", "missing"]
    ),
    "hidden_size-negative": (_set(hidden_size=-128), ["'hidden_size'", "positive"]),
    "hidden_size-zero": (_set(hidden_size=0), ["'hidden_size'", "positive"]),
    "hidden_size-bool": (_set(hidden_size=True), ["'hidden_size'", "bool"]),
    "hidden_size-str": (_set(hidden_size="128"), ["'hidden_size'", "str"]),
    "hidden_size-float": (_set(hidden_size=128.0), ["'hidden_size'", "float"]),
    "heads-zero": (_set(num_attention_heads=0), ["'num_attention_heads'"]),
    "kv_heads-zero": (_set(num_key_value_heads=0), ["'num_key_value_heads'"]),
    "kv_heads-negative": (_set(num_key_value_heads=-2), ["'num_key_value_heads'"]),
    "kv_heads-bool": (_set(num_key_value_heads=True), ["'num_key_value_heads'"]),
    "kv_heads-str": (_set(num_key_value_heads="2"), ["'num_key_value_heads'"]),
    "head_dim-zero": (_set(head_dim=0), ["'head_dim'"]),
    "head_dim-negative": (_set(head_dim=-32), ["'head_dim'"]),
    "head_dim-str": (_set(head_dim="32"), ["'head_dim'"]),
    "vocab-bool": (_set(vocab_size=True), ["'vocab_size'"]),
    "layers-zero": (_set(num_hidden_layers=0), ["'num_hidden_layers'"]),
    "intermediate-negative": (_set(intermediate_size=-1), ["'intermediate_size'"]),
    "eps-negative": (_set(rms_norm_eps=-1e-6), ["'rms_norm_eps'"]),
    "eps-str": (_set(rms_norm_eps="1e-6"), ["'rms_norm_eps'"]),
    "rope_theta-zero": (_set(rope_theta=0), ["'rope_theta'"]),
    "rope_theta-str": (_set(rope_theta="10000"), ["'rope_theta'"]),
    "heads-not-multiple-of-kv": (
        _set(num_attention_heads=4, num_key_value_heads=3),
        ["'num_attention_heads'=4", "'num_key_value_heads'=3"],
    ),
    "hidden-not-divisible-by-heads": (
        _set(hidden_size=130), ["'hidden_size'=130", "'num_attention_heads'=4", "'head_dim'"]
    ),
    "rope-yarn": (
        _set(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
        ["'yarn'", "rope", "llama3"],
    ),
    "rope-linear-old-key": (_set(rope_scaling={"type": "linear", "factor": 2.0}), ["'linear'"]),
    "rope_parameters-dynamic": (
        _set(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
        ["'dynamic'"],
    ),
    "llama3-without-factor": (
        _set(rope_scaling={"rope_type": "llama3", "original_max_position_embeddings": 8192}),
        ["llama3", "'factor'"],
    ),
    "rope_theta-conflict": (
        _set(rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        ["'rope_theta'=10000.0", "'rope_parameters.rope_theta'=500000.0"],
    ),
    "gelu": (_set(hidden_act="gelu"), ["'hidden_act'", "gelu"]),
    "mlp_bias": (_set(mlp_bias=True), ["'mlp_bias'"]),
    # Llama's attention_bias also biases o_proj; Megatron's add_qkv_bias cannot represent it.
    "llama-attention_bias": (_set(attention_bias=True), ["'attention_bias'"]),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_invalid_config_error_names_field(name):
    edit, fragments = BAD_CONFIGS[name]
    config = tiny_hf_config()
    edit(config)
    with pytest.raises(ModelConfigError) as error:
        parse_hf_config(config, source="/models/tiny/config.json")
    message = str(error.value)
    assert message.startswith("/models/tiny/config.json: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(error.value, ValueError)


def test_attention_bias_refusal_is_needed():
    """transformers' Llama with attention_bias has o_proj biases that ModelArchitecture lacks."""
    config = tiny_hf_config(attention_bias=True)
    without_o_bias = parse_hf_config(tiny_hf_config("Qwen2ForCausalLM")).num_parameters()
    o_bias = config["num_hidden_layers"] * config["hidden_size"]
    assert hf_parameter_count(config) == without_o_bias + o_bias


def test_accepted_edge_values():
    # null / absent kv heads mean multi-head attention, like transformers
    assert parse_hf_config(tiny_hf_config(num_key_value_heads=None)).num_kv_heads == 4
    config = tiny_hf_config()
    del config["num_key_value_heads"], config["rope_theta"], config["rms_norm_eps"]
    arch = parse_hf_config(config)
    assert (arch.num_kv_heads, arch.rope_theta, arch.rms_norm_eps) == (4, 10000.0, 1e-6)
    # integer theta, null rope_theta with the base in rope_parameters, agreeing duplicates
    assert parse_hf_config(tiny_hf_config(rope_theta=500000)).rope_theta == 500000.0
    assert parse_hf_config(
        tiny_hf_config(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    ).rope_theta == 1e6
    assert parse_hf_config(
        tiny_hf_config(rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    ).rope_scaling is None
    # explicit false / null switches are not refusals
    arch = parse_hf_config(tiny_hf_config(attention_bias=False, mlp_bias=False, head_dim=None))
    assert (arch.qkv_bias, arch.head_dim) == (False, 32)
    # Qwen2's sliding_window is inert while use_sliding_window is false
    assert parse_hf_config(
        tiny_hf_config("Qwen2ForCausalLM", sliding_window=64, use_sliding_window=False)
    ).sliding_window is None


def test_qwen2_per_layer_sliding_window_is_refused():
    with pytest.raises(ModelConfigError, match="'use_sliding_window'=true is not supported for Qwen2ForCausalLM"):
        parse_hf_config(tiny_hf_config("Qwen2ForCausalLM", sliding_window=64, use_sliding_window=True))


def test_mistral_sliding_window_reaches_megatron_attention():
    """HF lets token i attend to i-(w-1)..i; Megatron's (left, right) window must say (w-1, 0)."""
    arch = parse_hf_config(tiny_hf_config("MistralForCausalLM", sliding_window=16))
    assert build_transformer_config(arch, ParallelLayout()).window_size == (15, 0)
    no_window = parse_hf_config(tiny_hf_config("MistralForCausalLM", sliding_window=None))
    assert build_transformer_config(no_window, ParallelLayout()).window_size is None


def test_load_hf_config(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelConfigError, match=re.escape(f"{missing}: no such file")):
        load_hf_config(missing)

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ModelConfigError, match=re.escape(str(empty_dir / "config.json"))):
        load_hf_config(empty_dir)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(ModelConfigError) as error:
        load_hf_config(broken)
    assert str(broken / "config.json") in str(error.value)
    assert "not valid JSON" in str(error.value)

    (broken / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelConfigError, match="expected a JSON object"):
        load_hf_config(broken / "config.json")

    good = tmp_path / "qwen"
    good.mkdir()
    (good / "config.json").write_text(json.dumps(QWEN25_05B))
    for where in (good, good / "config.json", str(good)):
        arch = load_hf_config(where)
        assert arch.source == str(good / "config.json")
        assert arch.num_parameters() == 494_032_768

    (good / "config.json").write_text(json.dumps(dict(QWEN25_05B, hidden_act="gelu")))
    with pytest.raises(ModelConfigError) as error:
        load_hf_config(good)
    assert str(error.value).startswith(f"{good / 'config.json'}: 'hidden_act'")


TINY = parse_hf_config(tiny_hf_config(), source="tiny/config.json")  # 4 heads, 2 kv, 4 layers


@pytest.mark.parametrize(
    "layout, field",
    [
        (ParallelLayout(tensor=3), "num_attention_heads"),
        (ParallelLayout(tensor=4), "num_key_value_heads"),
        (ParallelLayout(pipeline=3), "num_hidden_layers"),
        (ParallelLayout(pipeline=2, virtual_pipeline=4), "num_hidden_layers"),
    ],
)
def test_layout_errors_name_field(layout, field):
    for check in (validate_layout, build_transformer_config):
        with pytest.raises(ModelConfigError) as error:
            check(TINY, layout)
        message = str(error.value)
        assert message.startswith("tiny/config.json: "), message
        assert f"'{field}'" in message, message


def test_layout_error_for_intermediate_size():
    arch = parse_hf_config(tiny_hf_config(intermediate_size=255))
    with pytest.raises(ModelConfigError, match="'intermediate_size'=255 .* tensor parallel size 2"):
        validate_layout(arch, ParallelLayout(tensor=2, sequence_parallel=True))


@pytest.mark.parametrize(
    "layout",
    [ParallelLayout(tensor=2), ParallelLayout(pipeline=4), ParallelLayout(pipeline=2, virtual_pipeline=2),
     ParallelLayout(tensor=2, pipeline=2, sequence_parallel=True), ParallelLayout(tensor=2, context=2)],
)
def test_valid_layouts_accepted(layout):
    validate_layout(TINY, layout)
    config = build_transformer_config(TINY, layout)
    assert config.tensor_model_parallel_size == layout.tensor
    assert config.pipeline_model_parallel_size == layout.pipeline
    assert config.virtual_pipeline_model_parallel_size == layout.virtual_pipeline
    assert config.sequence_parallel == layout.sequence_parallel
    assert config.context_parallel_size == layout.context


def test_context_parallel_model_with_local_layers_is_refused_naming_the_key():
    """Megatron-Core's local attention asserts CP == 1 only when the model is built deep inside
    GPTModel; the provider refuses first, in one line that says what CP needs."""
    with pytest.raises(ModelConfigError) as error:
        GPTModelProvider(TINY, ParallelLayout(context=2), layer_impl="local")
    assert str(error.value).startswith("parallel.context is 2 but context parallelism needs Transformer Engine")
    with pytest.raises(ParallelConfigError, match="parallel.context must be >= 1, got 0"):
        ParallelLayout(context=0)


def test_parallel_layout_errors():
    with pytest.raises(ParallelConfigError, match="virtual_pipeline needs parallel.pipeline"):
        ParallelLayout(virtual_pipeline=2)
    with pytest.raises(ParallelConfigError, match="virtual_pipeline"):
        ParallelLayout(pipeline=2, virtual_pipeline=1)
    with pytest.raises(ParallelConfigError, match="sequence_parallel needs parallel.tensor"):
        ParallelLayout(sequence_parallel=True)
    with pytest.raises(ParallelConfigError, match="parallel.tensor"):
        ParallelLayout(tensor=0)
    with pytest.raises(ParallelConfigError, match="parallel.pipeline"):
        ParallelLayout(pipeline=0)
    with pytest.raises(ParallelConfigError, match=r"world size 6 .*tensor \(4\).*pipeline \(1\)"):
        ParallelLayout(tensor=4).data_parallel_size(6)
    assert ParallelLayout(tensor=2, pipeline=2).data_parallel_size(8) == 2
    assert ParallelLayout().data_parallel_size(1) == 1
    assert issubclass(ParallelConfigError, ValueError)


# --------------------------------------------------------------------------------------------
# 3. Vocabulary padding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1, 127, 128, 129, 1000, 32000, 32768, 50257, 128256, 151646, 151936])
def test_padded_vocab_size(vocab):
    sizes = {tp: padded_vocab_size(vocab, tp) for tp in (1, 2, 4, 8)}
    for tp, size in sizes.items():
        assert size >= vocab
        assert size % tp == 0 and size % 128 == 0
        assert size - vocab < 128  # smallest such size
    assert len(set(sizes.values())) == 1  # same shape for every TP: checkpoints reshard
    # a non-power-of-two TP still gets a size it can split
    assert padded_vocab_size(vocab, 3) % 3 == 0 and padded_vocab_size(vocab, 3) >= vocab


# --------------------------------------------------------------------------------------------
# 4-6. Real Megatron-Core models in a single-process world
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron_world():
    init_distributed()
    init_model_parallel(ParallelLayout(), seed=1234)
    yield
    destroy_model_parallel()


LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
    "original_max_position_embeddings": 512,
}

BUILD_VARIANTS = {
    "llama-gqa": tiny_hf_config("LlamaForCausalLM"),
    "qwen2-bias-tied": tiny_hf_config("Qwen2ForCausalLM", tie_word_embeddings=True),
    "mistral": tiny_hf_config("MistralForCausalLM", sliding_window=4096),
    "llama3-rope": tiny_hf_config(
        "LlamaForCausalLM", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, max_position_embeddings=4096,
    ),
    "llama-head_dim-tied": tiny_hf_config("LlamaForCausalLM", head_dim=48, tie_word_embeddings=True),
}


def _padding_params(arch, padded):
    return (padded - arch.vocab_size) * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)


@pytest.mark.parametrize("name", list(BUILD_VARIANTS))
def test_build_gpt_model(megatron_world, name):
    config = BUILD_VARIANTS[name]
    arch = parse_hf_config(config)
    provider = GPTModelProvider(arch, ParallelLayout())
    padded = provider.padded_vocab_size
    assert padded == padded_vocab_size(arch.vocab_size, 1) == 1024 > arch.vocab_size
    model = provider(pre_process=True, post_process=True)
    params = dict(model.named_parameters())
    h, q, kv = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim

    assert params["embedding.word_embeddings.weight"].shape == (padded, h)
    assert model.share_embeddings_and_output_weights is arch.tie_word_embeddings
    if arch.tie_word_embeddings:
        assert not any(n.startswith("output_layer") for n in params)
        assert model.shared_embedding_or_output_weight() is params["embedding.word_embeddings.weight"]
    else:
        assert params["output_layer.weight"].shape == (padded, h)
    for i in range(arch.num_layers):
        prefix = f"decoder.layers.{i}."
        assert params[prefix + "self_attention.linear_qkv.weight"].shape == (q + 2 * kv, h)
        assert (prefix + "self_attention.linear_qkv.bias" in params) is arch.qkv_bias
        if arch.qkv_bias:
            assert params[prefix + "self_attention.linear_qkv.bias"].shape == (q + 2 * kv,)
        assert params[prefix + "self_attention.linear_proj.weight"].shape == (h, q)
        assert params[prefix + "mlp.linear_fc1.weight"].shape == (2 * arch.ffn_hidden_size, h)
        assert params[prefix + "mlp.linear_fc2.weight"].shape == (h, arch.ffn_hidden_size)
        assert params[prefix + "input_layernorm.weight"].shape == (h,)
        assert params[prefix + "pre_mlp_layernorm.weight"].shape == (h,)
    biases = {n for n in params if n.endswith(".bias")}
    assert biases == ({n for n in params if "linear_qkv.bias" in n} if arch.qkv_bias else set())

    total = sum(p.numel() for p in model.parameters())
    assert total - _padding_params(arch, padded) == arch.num_parameters() == hf_parameter_count(config)

    b, s = 2, 12
    ids = torch.randint(0, arch.vocab_size, (b, s))
    with torch.no_grad():
        logits = model(ids, torch.arange(s).expand(b, s), None)
    assert logits.shape == (b, s, padded)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stage_variants(megatron_world, tied):
    arch = parse_hf_config(tiny_hf_config(tie_word_embeddings=tied))
    provider = GPTModelProvider(arch, ParallelLayout())
    h, padded, b, s = arch.hidden_size, provider.padded_vocab_size, 2, 8
    ids, pos = torch.randint(0, arch.vocab_size, (b, s)), torch.arange(s).expand(b, s)

    def outside_layers(model):
        return {n for n, _ in model.named_parameters() if not n.startswith("decoder.layers.")}

    last = provider(pre_process=False, post_process=True)  # last pipeline stage
    # a last stage holds its own copy of the output weight, even when tied (synced over PP)
    assert outside_layers(last) == {"decoder.final_layernorm.weight", "output_layer.weight"}
    assert last.output_layer.weight.shape == (padded, h)
    last.set_input_tensor(torch.randn(s, b, h))
    with torch.no_grad():
        assert last(ids, pos, None).shape == (b, s, padded)

    first = provider(pre_process=True, post_process=False)  # first pipeline stage
    assert outside_layers(first) == {"embedding.word_embeddings.weight"}
    assert not hasattr(first, "output_layer")
    with torch.no_grad():
        assert first(ids, pos, None).shape == (s, b, h)  # hidden states, not logits

    middle = provider(pre_process=False, post_process=False)
    assert outside_layers(middle) == set()
    middle.set_input_tensor(torch.randn(s, b, h))
    with torch.no_grad():
        assert middle(ids, pos, None).shape == (s, b, h)


def test_init_model_parallel_refuses_layout_that_does_not_fit(megatron_world):
    from megatron.core import parallel_state

    with pytest.raises(ParallelConfigError, match="world size 1"):
        init_model_parallel(ParallelLayout(tensor=2), seed=0)
    # the existing TP1 world is left intact
    assert parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1


def test_local_layer_spec_on_cpu(megatron_world):
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from rift_megatron.models.norms import SequenceParallelRMSNorm

    platform = current_platform()
    assert platform == Platform(kind="cpu", backend="gloo")
    model = GPTModelProvider(parse_hf_config(tiny_hf_config()), ParallelLayout())()
    for module in model.modules():
        cls = type(module)
        assert not cls.__module__.startswith("transformer_engine"), cls
        assert not cls.__name__.startswith("TE"), cls
    layer = model.decoder.layers[0]
    assert type(layer.self_attention.linear_qkv) is ColumnParallelLinear
    assert type(layer.self_attention.linear_proj) is RowParallelLinear
    assert type(layer.self_attention.core_attention) is DotProductAttention
    assert type(layer.mlp.linear_fc1) is ColumnParallelLinear
    # RMSNorm (not LayerNorm) everywhere, the final norm included, with the checkpoint's epsilon
    for norm in (layer.input_layernorm, layer.pre_mlp_layernorm, model.decoder.final_layernorm):
        assert isinstance(norm, SequenceParallelRMSNorm), type(norm)
        assert norm.eps == 1e-6

    spec = layer_spec("local")
    local = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    assert spec.submodules.self_attention.submodules == local.submodules.self_attention.submodules
    assert spec.submodules.mlp.submodules == local.submodules.mlp.submodules
    # the key map that makes local checkpoints TE checkpoints is megatron-core's own
    assert spec.submodules.sharded_state_dict_keys_map == local.submodules.sharded_state_dict_keys_map


def test_transformer_engine_spec_is_megatron_s_own():
    from megatron.core.models.gpt import gpt_layer_specs

    local = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        pytest.skip("Transformer Engine is not installed here (the GPU path's TE spec cannot be built)")
    spec = layer_spec("transformer_engine")  # pragma: no cover - only on machines with Transformer Engine
    qkv = spec.submodules.self_attention.submodules.linear_qkv
    assert qkv is not local.submodules.self_attention.submodules.linear_qkv
    assert "TE" in qkv.__name__


# --------------------------------------------------------------------------------------------
# 5. Rotary frequencies agree with transformers
# --------------------------------------------------------------------------------------------


def _megatron_inv_freq(config: dict) -> torch.Tensor:
    model = GPTModelProvider(parse_hf_config(config), ParallelLayout())()
    return model.rotary_pos_emb.inv_freq.detach().cpu()


def test_llama3_rope_matches_transformers_non_default_factors(megatron_world):
    hf = LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_parameters=dict(LLAMA3_SCALING, rope_theta=500000.0), architectures=["LlamaForCausalLM"],
    )
    expected = LlamaRotaryEmbedding(hf).inv_freq
    base = 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    ratio = expected / base
    # the three llama3 regimes are all exercised: unchanged, divided by factor, smoothed
    assert torch.isclose(ratio, torch.tensor(1.0)).any()
    assert torch.isclose(ratio, torch.tensor(1 / 16.0)).any()
    assert ((ratio < 0.999) & (ratio > 1 / 16.0 + 1e-4)).any()

    # the transformers-5 config (rope_parameters) and the old layout (top-level keys) agree
    v5 = json.loads(hf.to_json_string())
    old = tiny_hf_config(
        rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, max_position_embeddings=4096, num_hidden_layers=2
    )
    for config in (v5, old):
        actual = _megatron_inv_freq(config)
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)

    # Megatron's own llama3 scaling (hard-coded 1/4/8192) would not match: the override matters
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    megatron_default = RotaryEmbedding(32, 1.0, rotary_base=500000.0, rope_scaling=True,
                                       rope_scaling_factor=16.0, use_cpu_initialization=True).inv_freq
    assert not torch.allclose(megatron_default, expected, rtol=1e-3)


def test_llama31_rope_matches_transformers(megatron_world):
    small = shrink(LLAMA31_8B)
    small["max_position_embeddings"] = 16384
    expected = LlamaRotaryEmbedding(LlamaConfig(**small)).inv_freq
    torch.testing.assert_close(_megatron_inv_freq(small), expected, rtol=1e-6, atol=0)


def test_default_rope_matches_transformers(megatron_world):
    small = shrink(QWEN25_05B)
    hf = Qwen2Config(**small)
    assert hf.rope_parameters["rope_type"] == "default"
    expected = Qwen2RotaryEmbedding(hf).inv_freq
    torch.testing.assert_close(_megatron_inv_freq(small), expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# 6. TransformerConfig
# --------------------------------------------------------------------------------------------


def test_transformer_config_fields():
    arch = parse_hf_config(
        tiny_hf_config("Qwen2ForCausalLM", head_dim=48, rms_norm_eps=1e-5, initializer_range=0.01)
    )
    assert arch.head_dim != arch.hidden_size // arch.num_attention_heads
    config = build_transformer_config(arch, ParallelLayout())
    assert config.calculate_per_token_loss is True
    assert config.num_attention_heads == 4
    assert config.num_query_groups == 2
    assert config.kv_channels == 48
    assert config.hidden_size == 128 and config.ffn_hidden_size == 256 and config.num_layers == 4
    assert config.layernorm_epsilon == 1e-5
    assert config.normalization == "RMSNorm"
    assert config.gated_linear_unit is True and config.activation_func is F.silu
    assert config.add_bias_linear is False
    assert config.add_qkv_bias is True
    assert config.init_method_std == 0.01
    assert config.hidden_dropout == 0.0 and config.attention_dropout == 0.0
    assert config.params_dtype == torch.float32 and not config.bf16 and not config.fp16
    assert config.use_cpu_initialization is True  # CPU platform

    assert build_transformer_config(parse_hf_config(tiny_hf_config()), ParallelLayout()).add_qkv_bias is False
    bf16 = build_transformer_config(arch, ParallelLayout(), PrecisionConfig("bf16"))
    assert bf16.params_dtype == torch.bfloat16 and bf16.bf16
    with pytest.raises(ValueError, match="dtype"):
        PrecisionConfig("fp8")


def test_explicit_head_dim_model_runs(megatron_world):
    """kv_channels != hidden / heads builds and runs: linear_proj maps heads*head_dim -> hidden."""
    arch = parse_hf_config(tiny_hf_config(head_dim=48))
    model = GPTModelProvider(arch, ParallelLayout())()
    attention = model.decoder.layers[0].self_attention
    assert attention.linear_proj.weight.shape == (128, 4 * 48)
    assert model.rotary_pos_emb.inv_freq.numel() == 48 // 2
    with torch.no_grad():
        out = model(torch.randint(0, 1000, (1, 5)), torch.arange(5)[None], None)
    assert out.shape == (1, 5, 1024) and torch.isfinite(out).all()
    assert not math.isnan(float(out.std()))
