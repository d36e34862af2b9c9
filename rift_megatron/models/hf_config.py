"""Read a Hugging Face `config.json` into a validated, family-neutral architecture description.

This is where a user's model directory enters the program, so every problem is reported here
with the file and field named, instead of as a shape error deep inside Megatron-Core.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rift_megatron.models.families import FAMILIES, Family


class ModelConfigError(ValueError):
    """A config.json that cannot describe a supported model."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3-style frequency-dependent rope scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArchitecture:
    """Everything the model providers and conversion need to know about a checkpoint."""

    architecture: str
    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    qkv_bias: bool
    sliding_window: int | None
    initializer_range: float
    attention_dropout: float
    torch_dtype: str | None
    source: str = "config.json"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def kv_group_size(self) -> int:
        """Query heads per key/value head (1 = multi-head, >1 = grouped-query attention)."""
        return self.num_attention_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        """Parameter count of the HF model (unpadded vocabulary)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * self.ffn_hidden_size
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h


def _require(config: dict[str, Any], key: str, kind: type, source: str) -> Any:
    if key not in config:
        raise ModelConfigError(f"{source}: required field '{key}' is missing")
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ModelConfigError(
            f"{source}: field '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    if kind in (int, float) and value <= 0:
        raise ModelConfigError(f"{source}: field '{key}' must be positive, got {value!r}")
    return value


def _optional(config: dict[str, Any], key: str, kind: type, default: Any, source: str) -> Any:
    """Like `_require`, but an absent or null field takes `default` (HF's own convention)."""
    if config.get(key) is None:
        return default
    return _require(config, key, kind, source)


def _rope_settings(config: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """Rope base and scaling from either layout.

    Real Llama 3.x / Qwen2.5 checkpoints carry top-level `rope_theta` and `rope_scaling`;
    transformers 5 writes both into `rope_parameters`. Either is accepted; conflicting values are
    an error rather than a silent choice.
    """
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = _optional(config, "rope_theta", float, None, source)
    if theta is None:
        theta = _optional(params, "rope_theta", float, 10000.0, f"{source}: rope_parameters")
    elif params.get("rope_theta") is not None and theta != params["rope_theta"]:
        raise ModelConfigError(
            f"{source}: 'rope_theta'={config['rope_theta']} disagrees with "
            f"'rope_parameters.rope_theta'={params['rope_theta']}"
        )
    if not scaling and params.get("rope_type", "default") != "default":
        scaling = params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ModelConfigError(
            f"{source}: rope scaling type '{rope_type}' is not supported (supported: default, llama3)"
        )
    try:
        return float(theta), RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise ModelConfigError(f"{source}: llama3 rope scaling needs field {missing}") from None


def parse_hf_config(config: dict[str, Any], source: str = "config.json") -> ModelArchitecture:
    """Validate a config.json dict and describe the model; errors name `source` and the field."""
    architectures = config.get("architectures") or []
    if not architectures:
        raise ModelConfigError(f"{source}: field 'architectures' is missing or empty")
    architecture = architectures[0]
    family = FAMILIES.get(architecture)
    if family is None:
        raise ModelConfigError(
            f"{source}: architecture '{architecture}' is not supported; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    hidden = _require(config, "hidden_size", int, source)
    heads = _require(config, "num_attention_heads", int, source)
    # Absent or null means multi-head attention (transformers does the same); 0 is an error.
    kv_heads = _optional(config, "num_key_value_heads", int, heads, source)
    if heads % kv_heads:
        raise ModelConfigError(
            f"{source}: 'num_attention_heads'={heads} must be a multiple of "
            f"'num_key_value_heads'={kv_heads}"
        )
    head_dim = _optional(config, "head_dim", int, hidden // heads, source)
    if config.get("head_dim") is None and hidden % heads:
        raise ModelConfigError(
            f"{source}: 'hidden_size'={hidden} is not divisible by 'num_attention_heads'={heads} "
            "and no 'head_dim' is given"
        )
    hidden_act = config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ModelConfigError(f"{source}: 'hidden_act'={hidden_act!r} is not supported (only silu)")
    if config.get("mlp_bias"):
        raise ModelConfigError(f"{source}: 'mlp_bias'=true is not supported")
    if family.qkv_bias_field and config.get(family.qkv_bias_field):
        # Llama's attention_bias also puts a bias on o_proj, which Megatron's add_qkv_bias does
        # not create: accepting it would silently drop those weights.
        raise ModelConfigError(
            f"{source}: '{family.qkv_bias_field}'=true is not supported for {architecture} "
            "(it adds an output-projection bias as well as q/k/v biases)"
        )
    rope_theta, rope_scaling = _rope_settings(config, source)
    sliding_window = _optional(config, "sliding_window", int, None, source)
    if family.sliding_window_flag:
        if config.get(family.sliding_window_flag):
            raise ModelConfigError(
                f"{source}: '{family.sliding_window_flag}'=true is not supported for {architecture} "
                "(its sliding window covers only some layers)"
            )
        sliding_window = None
    return ModelArchitecture(
        architecture=architecture,
        family=family,
        vocab_size=_require(config, "vocab_size", int, source),
        hidden_size=hidden,
        num_layers=_require(config, "num_hidden_layers", int, source),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=_require(config, "intermediate_size", int, source),
        max_position_embeddings=_require(config, "max_position_embeddings", int, source),
        rms_norm_eps=_optional(config, "rms_norm_eps", float, 1e-6, source),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=_optional(
            config, "tie_word_embeddings", bool, family.tied_embeddings_default, source
        ),
        qkv_bias=bool(config.get(family.qkv_bias_field, family.qkv_bias_default))
        if family.qkv_bias_field
        else family.qkv_bias_default,
        sliding_window=sliding_window,
        initializer_range=float(config.get("initializer_range", 0.02)),
        attention_dropout=float(config.get("attention_dropout", 0.0)),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
        source=source,
        raw=dict(config),
    )


def load_hf_config(model_dir: str | Path) -> ModelArchitecture:
    """Read `<model_dir>/config.json` (or a config.json path) and parse it."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{path}: no such file (expected a Hugging Face config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    return parse_hf_config(config, source=str(path))
