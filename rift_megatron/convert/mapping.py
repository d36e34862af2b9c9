"""Declarative Hugging Face <-> Megatron-Core weight mappings for the Llama family.

One table says which HF tensors make up each Megatron parameter and how (the way
Megatron-Bridge's per-model bridges declare `AutoMapping` / `QKVMapping` / `GatedMLPMapping`).
Megatron names are checkpoint names (`models/param_names.py`): the per-layer form of the keys
Megatron's `dist_checkpointing` stores, which Transformer Engine models use as parameter names
and local-spec models reach through their spec's `sharded_state_dict_keys_map`. So one table
serves both layer implementations. Every mapping converts one *full* (unsharded) parameter. Tensor-parallel
sharding, stacking of layers and the on-disk key names are Megatron's own `sharded_state_dict`
business (see `layout.py`), so nothing here changes with TP or PP. The same table serves
checkpoint conversion and the trainer -> vLLM weight sync.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rift_megatron.models.hf_config import ModelArchitecture
from rift_megatron.models.provider import padded_vocab_size

Shape = tuple[int, ...]


def _always(arch: ModelArchitecture) -> bool:
    return True


@dataclass(frozen=True)
class RowPiece:
    """Megatron rows [param_start, param_start + rows) are HF tensor `hf_index`'s rows from `hf_start`."""

    hf_index: int
    hf_start: int
    param_start: int
    rows: int


@dataclass(frozen=True)
class ParamMapping:
    """Base: one Megatron parameter <- one or more HF tensors. Names may contain `{layer}`."""

    megatron: str
    hf: tuple[str, ...]
    when: Callable[[ModelArchitecture], bool] = field(default=_always, compare=False)

    def for_layer(self, layer: int | None) -> "ParamMapping":
        if layer is None:
            return self
        return dataclasses.replace(
            self, megatron=self.megatron.format(layer=layer), hf=tuple(name.format(layer=layer) for name in self.hf)
        )

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron

    def hf_shapes(self, arch: ModelArchitecture) -> list[Shape]:
        raise NotImplementedError

    def to_megatron(self, tensors: Sequence[torch.Tensor], arch: ModelArchitecture) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, arch: ModelArchitecture) -> list[torch.Tensor]:
        raise NotImplementedError

    def row_pieces(self, arch: ModelArchitecture, start: int, stop: int) -> list[RowPiece] | None:
        """Which HF rows make up Megatron rows [start, stop), or None if rows do not map to rows.

        Row-wise mappings let conversion stream a large parameter in row blocks; rows of the
        Megatron parameter not covered by any piece are zero (vocabulary padding).
        """
        return None


@dataclass(frozen=True)
class Direct(ParamMapping):
    """Same tensor on both sides (norms, o_proj, down_proj)."""

    shape: Callable[[ModelArchitecture], Shape] = field(default=lambda arch: (), compare=False)

    def hf_shapes(self, arch: ModelArchitecture) -> list[Shape]:
        return [self.shape(arch)]

    def to_megatron(self, tensors: Sequence[torch.Tensor], arch: ModelArchitecture) -> torch.Tensor:
        return tensors[0]

    def to_hf(self, tensor: torch.Tensor, arch: ModelArchitecture) -> list[torch.Tensor]:
        return [tensor]

    def row_pieces(self, arch: ModelArchitecture, start: int, stop: int) -> list[RowPiece] | None:
        return [RowPiece(0, start, start, stop - start)] if len(self.shape(arch)) > 1 else None


@dataclass(frozen=True)
class VocabRows(ParamMapping):
    """Embedding / LM head: Megatron pads the vocabulary rows to a TP-friendly size.

    Padding rows are zero going in and are stripped coming out, so they never reach an HF
    checkpoint (a classic source of corrupted exports).
    """

    def hf_shapes(self, arch: ModelArchitecture) -> list[Shape]:
        return [(arch.vocab_size, arch.hidden_size)]

    def to_megatron(self, tensors: Sequence[torch.Tensor], arch: ModelArchitecture) -> torch.Tensor:
        (rows,) = tensors
        padded = padded_vocab_size(arch.vocab_size, 1)
        out = rows.new_zeros((padded, rows.shape[1]))
        out[: rows.shape[0]] = rows
        return out

    def to_hf(self, tensor: torch.Tensor, arch: ModelArchitecture) -> list[torch.Tensor]:
        return [tensor[: arch.vocab_size]]

    def row_pieces(self, arch: ModelArchitecture, start: int, stop: int) -> list[RowPiece] | None:
        real_stop = min(stop, arch.vocab_size)
        return [RowPiece(0, start, start, real_stop - start)] if start < real_stop else []


@dataclass(frozen=True)
class FusedQKV(ParamMapping):
    """HF q/k/v projections (weights or biases) <-> Megatron's fused `linear_qkv`.

    Megatron groups rows by key/value head: for each KV group g, the query heads that share it,
    then k_g, then v_g. Tensor parallelism splits whole groups, so this TP1 layout is what every
    TP degree's shards concatenate to.
    """

    def hf_shapes(self, arch: ModelArchitecture) -> list[Shape]:
        rest = (arch.hidden_size,) if self.megatron.endswith("weight") else ()
        d = arch.head_dim
        return [(arch.num_attention_heads * d, *rest), (arch.num_kv_heads * d, *rest), (arch.num_kv_heads * d, *rest)]

    def to_megatron(self, tensors: Sequence[torch.Tensor], arch: ModelArchitecture) -> torch.Tensor:
        q, k, v = tensors
        groups, d = arch.num_kv_heads, arch.head_dim
        rest = q.shape[1:]
        fused = torch.cat(
            [q.reshape(groups, arch.kv_group_size * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)],
            dim=1,
        )
        return fused.reshape(-1, *rest)

    def to_hf(self, tensor: torch.Tensor, arch: ModelArchitecture) -> list[torch.Tensor]:
        groups, d = arch.num_kv_heads, arch.head_dim
        rest = tensor.shape[1:]
        grouped = tensor.reshape(groups, (arch.kv_group_size + 2) * d, *rest)
        q, k, v = grouped.split([arch.kv_group_size * d, d, d], dim=1)
        return [part.reshape(-1, *rest).contiguous() for part in (q, k, v)]


@dataclass(frozen=True)
class FusedGateUp(ParamMapping):
    """HF gate_proj / up_proj <-> Megatron's SwiGLU `linear_fc1` = [gate; up] (TP1 layout)."""

    def hf_shapes(self, arch: ModelArchitecture) -> list[Shape]:
        return [(arch.ffn_hidden_size, arch.hidden_size)] * 2

    def to_megatron(self, tensors: Sequence[torch.Tensor], arch: ModelArchitecture) -> torch.Tensor:
        return torch.cat(list(tensors), dim=0)

    def to_hf(self, tensor: torch.Tensor, arch: ModelArchitecture) -> list[torch.Tensor]:
        return [part.contiguous() for part in tensor.chunk(2, dim=0)]

    def row_pieces(self, arch: ModelArchitecture, start: int, stop: int) -> list[RowPiece] | None:
        ffn, pieces = arch.ffn_hidden_size, []
        if start < ffn:
            pieces.append(RowPiece(0, start, start, min(stop, ffn) - start))
        if stop > ffn:
            begin = max(start, ffn)
            pieces.append(RowPiece(1, begin - ffn, begin, stop - begin))
        return pieces


def _hidden(arch: ModelArchitecture) -> Shape:
    return (arch.hidden_size,)


def _has_qkv_bias(arch: ModelArchitecture) -> bool:
    return arch.qkv_bias


def _untied(arch: ModelArchitecture) -> bool:
    return not arch.tie_word_embeddings


_LAYER = "decoder.layers.{layer}."
_HF_LAYER = "model.layers.{layer}."
_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

LLAMA_FAMILY: tuple[ParamMapping, ...] = (
    VocabRows("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Direct(
        _LAYER + "self_attention.linear_qkv.layer_norm_weight", (_HF_LAYER + "input_layernorm.weight",), shape=_hidden
    ),
    FusedQKV(_LAYER + "self_attention.linear_qkv.weight", tuple(f"{_HF_LAYER}{p}.weight" for p in _ATTN)),
    FusedQKV(
        _LAYER + "self_attention.linear_qkv.bias", tuple(f"{_HF_LAYER}{p}.bias" for p in _ATTN), when=_has_qkv_bias
    ),
    Direct(
        _LAYER + "self_attention.linear_proj.weight",
        (_HF_LAYER + "self_attn.o_proj.weight",),
        shape=lambda arch: (arch.hidden_size, arch.num_attention_heads * arch.head_dim),
    ),
    Direct(
        _LAYER + "mlp.linear_fc1.layer_norm_weight", (_HF_LAYER + "post_attention_layernorm.weight",), shape=_hidden
    ),
    FusedGateUp(_LAYER + "mlp.linear_fc1.weight", (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight")),
    Direct(
        _LAYER + "mlp.linear_fc2.weight",
        (_HF_LAYER + "mlp.down_proj.weight",),
        shape=lambda arch: (arch.hidden_size, arch.ffn_hidden_size),
    ),
    Direct("decoder.final_layernorm.weight", ("model.norm.weight",), shape=_hidden),
    VocabRows("output_layer.weight", ("lm_head.weight",), when=_untied),
)

# Llama, Qwen2 and Mistral share HF tensor names and Megatron's GPT block; they differ only in
# which conditional rows above apply (qkv bias, tied embeddings).
TABLES: dict[str, tuple[ParamMapping, ...]] = {"llama": LLAMA_FAMILY, "qwen2": LLAMA_FAMILY, "mistral": LLAMA_FAMILY}

# HF tensors that carry no weights (recomputed buffers in old checkpoints).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def expand(arch: ModelArchitecture) -> list[ParamMapping]:
    """The table instantiated for this model: one mapping per Megatron parameter, in HF order."""
    mappings = []
    for mapping in TABLES[arch.family.name]:
        if not mapping.when(arch):
            continue
        if mapping.per_layer:
            mappings.extend(mapping.for_layer(layer) for layer in range(arch.num_layers))
        else:
            mappings.append(mapping.for_layer(None))
    mappings.sort(key=_hf_order)
    return mappings


def _hf_order(mapping: ParamMapping) -> tuple:
    """Embeddings, then layer by layer, then the final norm and head (how HF writes them)."""
    name = mapping.hf[0]
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]))
    return (0 if "embed_tokens" in name else 2, 0)


def megatron_rows(
    mapping: ParamMapping,
    read: Callable[[str, tuple[int, int] | None], torch.Tensor],
    arch: ModelArchitecture,
    start: int,
    stop: int,
) -> torch.Tensor:
    """Rows [start, stop) of the Megatron parameter, reading only the HF rows they come from.

    `read(name, rows)` reads an HF tensor (rows=None: whole). Mappings that are not row-wise
    (fused QKV) are assembled whole and sliced: one layer's q/k/v, never a large tensor.
    """
    pieces = mapping.row_pieces(arch, start, stop)
    if pieces is None:
        return mapping.to_megatron([read(name, None) for name in mapping.hf], arch)[start:stop]
    if len(pieces) == 1 and pieces[0].param_start == start and pieces[0].rows == stop - start:
        piece = pieces[0]
        return read(mapping.hf[piece.hf_index], (piece.hf_start, piece.hf_start + piece.rows))
    blocks = [read(mapping.hf[p.hf_index], (p.hf_start, p.hf_start + p.rows)) for p in pieces]
    if not blocks:  # only padding rows: shape and dtype come from the first HF tensor
        template = read(mapping.hf[0], (0, 0))
        return template.new_zeros((stop - start, *template.shape[1:]))
    out = blocks[0].new_zeros((stop - start, *blocks[0].shape[1:]))
    for piece, block in zip(pieces, blocks):
        out[piece.param_start - start : piece.param_start - start + piece.rows] = block
    return out


def hf_row_blocks(
    mapping: ParamMapping, arch: ModelArchitecture, rows: torch.Tensor, start: int
) -> list[tuple[str, int, torch.Tensor]] | None:
    """(HF name, first HF row, rows) for Megatron rows [start, start + len(rows)); None if the
    mapping is not row-wise (then convert the whole parameter with `to_hf`)."""
    pieces = mapping.row_pieces(arch, start, start + rows.shape[0])
    if pieces is None:
        return None
    return [
        (mapping.hf[p.hf_index], p.hf_start, rows[p.param_start - start : p.param_start - start + p.rows])
        for p in pieces
    ]
