"""Model configs: the sizes of a Co-DINO, as pydantic records with the keys of the config files.

One schema for every config: the built-in full model is written in the same JSON format as the test
configs (`tests/data/tiny_config.json`), so the path that builds Co-DINO Swin-L is the path the tiny
parity tests exercise, and an engine's manifest.json stores the same dict. Field names are the
file's keys, and `CoDinoConfig.to_dict()` writes back what was read: the keys it was given, plus
the defaults that follow from other fields (strides, out_indices, head.num_classes,
head.pos_num_feats). Keys the model does not read (the source config's descriptions and training
settings) are kept as they are; keys that restate another one (msda_levels,
two_stage_num_proposals, num_pred_branches) or name the only variant implemented (`type`,
use_abs_pos_embed, patch_norm, pos_normalize) are checked. No torch import here: the CLI reads
configs before it decides whether to load torch at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar

from codetr_stream.compile.config_error import ConfigError
from pydantic import (
    BaseModel,
    ConfigDict,
    Strict,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = ["BUILTIN", "CoDinoConfig", "ConfigError", "HeadConfig", "NeckConfig", "SwinConfig",
           "TransformerConfig", "parse_config"]

Float = Annotated[float, Strict()]  # an int is a float, a bool or a string is not
Ints = tuple[StrictInt, ...]


class _Section(BaseModel):
    # `allow`: keys the model does not read stay, so a config is written back as it came.
    model_config = ConfigDict(extra="allow", frozen=True)

    TYPE: ClassVar[str | None] = None  # the one `type` implemented, where a section has one

    @field_validator("type", check_fields=False)
    @classmethod
    def _implemented(cls, value: Any) -> Any:
        if value != cls.TYPE:
            raise ValueError(f"must be {cls.TYPE!r} (the only one implemented), got {value!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        """The section as JSON values, with the keys it was read with."""
        return self.model_dump(mode="json", exclude_unset=True)


class SwinConfig(_Section):
    TYPE = "SwinTransformer"
    type: str = TYPE
    embed_dims: StrictInt
    depths: Ints
    num_heads: Ints
    window_size: StrictInt
    patch_size: StrictInt = 4
    strides: Ints  # default: patch_size, then 2 for every later stage
    mlp_ratio: Float = 4.0
    qkv_bias: StrictBool = True
    in_channels: StrictInt = 3
    out_indices: Ints  # default: every stage
    use_abs_pos_embed: StrictBool = False
    patch_norm: StrictBool = True

    @model_validator(mode="before")
    @classmethod
    def _per_stage_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("depths"), list | tuple):
            stages = len(data["depths"])
            patch = data.get("patch_size", 4)
            data = {"strides": [patch] + [2] * (stages - 1), "out_indices": list(range(stages)),
                    **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SwinConfig:
        stages = len(self.depths)
        _check(not self.use_abs_pos_embed, "backbone.use_abs_pos_embed=true is not supported")
        _check(self.patch_norm, "backbone.patch_norm=false is not supported")
        _check(len(self.num_heads) == stages and len(self.strides) == stages,
               "backbone.depths, num_heads and strides must have one entry per stage")
        _check(self.strides[0] == self.patch_size, "backbone.strides[0] must equal patch_size")
        _check(self.in_channels == 3, "backbone.in_channels must be 3 (RGB input)")
        _check(all(0 <= i < stages for i in self.out_indices), "backbone.out_indices out of range")
        for i, heads in enumerate(self.num_heads):
            _check(self.stage_channels[i] % heads == 0,
                   f"backbone stage {i}: {self.stage_channels[i]} channels not divisible by "
                   f"{heads} heads")
        return self

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of each stage: the patch merging after a stage doubles them."""
        return tuple(self.embed_dims * 2**i for i in range(len(self.depths)))


class NeckConfig(_Section):
    TYPE = "ChannelMapper"
    type: str = TYPE
    in_channels: Ints
    out_channels: StrictInt
    num_outs: StrictInt
    kernel_size: StrictInt = 1
    gn_num_groups: StrictInt = 32


class TransformerConfig(_Section):
    TYPE = "CoDinoTransformer"
    type: str = TYPE
    embed_dims: StrictInt
    num_feature_levels: StrictInt
    encoder_layers: StrictInt
    decoder_layers: StrictInt
    msda_heads: StrictInt
    msda_points: StrictInt
    decoder_self_attn_heads: StrictInt
    ffn_channels: StrictInt
    num_co_heads: StrictInt = 2
    msda_levels: StrictInt | None = None  # restates num_feature_levels
    two_stage_num_proposals: StrictInt | None = None  # restates head.num_query


class HeadConfig(_Section):
    TYPE = "CoDINOHead"
    type: str = TYPE
    num_query: StrictInt
    num_classes: StrictInt  # default: the config's top-level num_classes
    max_per_img: StrictInt
    num_reg_fcs: StrictInt = 2
    downsample_gn_num_groups: StrictInt = 32
    pos_num_feats: StrictInt  # default: transformer.embed_dims / 2
    pos_temperature: Float = 20.0
    pos_scale: Float = 6.283185307179586
    pos_offset: Float = 0.0
    pos_eps: Float = 1e-6
    pos_normalize: StrictBool = True
    num_pred_branches: StrictInt | None = None  # restates transformer.decoder_layers + 1


class CoDinoConfig(_Section):
    name: str = "custom"
    num_classes: StrictInt | None = None
    backbone: SwinConfig
    neck: NeckConfig
    transformer: TransformerConfig
    head: HeadConfig

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_other_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        head, transformer = data.get("head"), data.get("transformer")
        if isinstance(head, dict):
            head = dict(head)
            if "num_classes" not in head and "num_classes" in data:
                head["num_classes"] = data["num_classes"]
            if ("pos_num_feats" not in head and isinstance(transformer, dict)
                    and isinstance(transformer.get("embed_dims"), int)):
                head["pos_num_feats"] = transformer["embed_dims"] // 2
            data = {**data, "head": head}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> CoDinoConfig:
        backbone, neck, t, head = self.backbone, self.neck, self.transformer, self.head
        expected = tuple(backbone.stage_channels[i] for i in backbone.out_indices)
        _check(neck.in_channels == expected,
               f"neck.in_channels {list(neck.in_channels)} must equal the backbone's output "
               f"channels {list(expected)}")
        _check(neck.num_outs >= len(neck.in_channels), "neck.num_outs must be >= len(in_channels)")
        d = t.embed_dims
        _check((t.msda_levels or t.num_feature_levels) == t.num_feature_levels == neck.num_outs,
               "transformer.num_feature_levels, msda_levels and neck.num_outs must be equal")
        _check(neck.out_channels == d, "neck.out_channels must equal transformer.embed_dims")
        _check(d % t.msda_heads == 0 and d % t.decoder_self_attn_heads == 0,
               "transformer.embed_dims must be divisible by msda_heads and "
               "decoder_self_attn_heads")
        _check(d % 2 == 0, "transformer.embed_dims must be even (sine encoding)")
        _check(head.pos_normalize, "head.pos_normalize=false is not supported")
        _check(2 * head.pos_num_feats == d, "head.pos_num_feats must be transformer.embed_dims / 2")
        _check((t.two_stage_num_proposals or head.num_query) == head.num_query,
               "transformer.two_stage_num_proposals must equal head.num_query")
        _check((head.num_pred_branches or t.decoder_layers + 1) == t.decoder_layers + 1,
               "head.num_pred_branches must be decoder_layers + 1")
        _check(head.max_per_img <= head.num_query * head.num_classes,
               "head.max_per_img must be <= num_query * num_classes")
        return self


class _Inconsistent(ValueError):
    """A check across fields failed; its message is the whole problem."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise _Inconsistent(message)


def _full_model() -> dict[str, Any]:
    """Co-DINO 5-scale Swin-L (o365->coco) as the official config states it (docs/model.md)."""
    return {
        "name": "co_dino_swin_l",
        "num_classes": 80,
        "backbone": {"type": "SwinTransformer", "embed_dims": 192, "depths": [2, 2, 18, 2],
                     "num_heads": [6, 12, 24, 48], "window_size": 12, "patch_size": 4,
                     "strides": [4, 2, 2, 2], "mlp_ratio": 4, "qkv_bias": True,
                     "out_indices": [0, 1, 2, 3], "use_abs_pos_embed": False, "patch_norm": True},
        "neck": {"type": "ChannelMapper", "in_channels": [192, 384, 768, 1536],
                 "out_channels": 256, "kernel_size": 1, "num_outs": 5, "gn_num_groups": 32},
        "transformer": {"type": "CoDinoTransformer", "embed_dims": 256, "num_feature_levels": 5,
                        "two_stage_num_proposals": 900, "num_co_heads": 2, "encoder_layers": 6,
                        "decoder_layers": 6, "msda_heads": 8, "msda_levels": 5, "msda_points": 4,
                        "decoder_self_attn_heads": 8, "ffn_channels": 2048},
        "head": {"type": "CoDINOHead", "num_query": 900, "num_classes": 80, "max_per_img": 300,
                 "num_reg_fcs": 2, "num_pred_branches": 7, "downsample_gn_num_groups": 32,
                 "pos_num_feats": 128, "pos_temperature": 20, "pos_normalize": True,
                 "pos_scale": 6.283185307179586, "pos_offset": 0.0, "pos_eps": 1e-6},
    }


BUILTIN: dict[str, Any] = {"co_dino_swin_l": _full_model}
SECTIONS = ("backbone", "neck", "transformer", "head")
_KINDS = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}


def _problem(error: dict[str, Any], raw: dict[str, Any]) -> str:
    """One pydantic error as the line that names the field: `config field 'a.b' ...`."""
    loc = [part for part in error["loc"] if isinstance(part, str | int)]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and isinstance(error.get("ctx", {}).get("error"),
                                                     _Inconsistent):
        return message
    if len(loc) == 1 and loc[0] in SECTIONS and error["type"] in ("missing", "model_type"):
        return f"config section '{loc[0]}' is missing or not an object"
    if (loc and isinstance(loc[-1], int)) or error["type"] == "tuple_type":
        loc = [part for part in loc if isinstance(part, str)]
        value: Any = raw
        for part in loc:
            value = value.get(part) if isinstance(value, dict) else None
        return f"config field '{'.'.join(loc)}' must be a list of ints, got {value!r}"
    field = ".".join(map(str, loc))
    if error["type"] == "missing":
        return f"config field '{field}' is missing"
    if error["type"] in _KINDS:
        return f"config field '{field}' must be {_KINDS[error['type']]}, got {error['input']!r}"
    return f"config field '{field}' {message}"


def parse_config(config: CoDinoConfig | dict[str, Any] | str | Path) -> CoDinoConfig:
    """Turn a built-in name, a JSON file path or a parsed dict into a checked `CoDinoConfig`
    (one already parsed is returned as it is); `ConfigError` names the first problem."""
    if isinstance(config, CoDinoConfig):
        return config
    if isinstance(config, Path) or (isinstance(config, str) and config.endswith(".json")):
        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read model config ({exc})") from exc
    if isinstance(config, str):
        if config not in BUILTIN:
            raise ConfigError(f"unknown model config {config!r}; known names: "
                              f"{', '.join(sorted(BUILTIN))} (or pass a dict / .json path)")
        config = BUILTIN[config]()
    if not isinstance(config, dict):
        raise ConfigError(f"model config must be a dict, a .json path or a name, got {config!r}")
    try:
        return CoDinoConfig.model_validate(config)
    except ValidationError as exc:
        raise ConfigError(_problem(exc.errors()[0], config)) from None
