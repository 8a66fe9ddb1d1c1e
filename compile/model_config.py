"""Model sizes as typed records, parsed from the `tiny_config.json` format or a built-in name.

One parser for every config: the built-in full model is written in the same JSON format as the test
configs, so the path that builds Co-DINO Swin-L is the path the tiny parity tests exercise. No torch
import here: the CLI reads configs before it decides whether to load torch at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model config that cannot be built; the message names the field and the fix."""


@dataclass(frozen=True)
class SwinConfig:
    embed_dims: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    patch_size: int = 4
    strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    in_channels: int = 3
    out_indices: tuple[int, ...] = (0, 1, 2, 3)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of each stage: the patch merging after a stage doubles them."""
        return tuple(self.embed_dims * 2**i for i in range(len(self.depths)))


@dataclass(frozen=True)
class NeckConfig:
    in_channels: tuple[int, ...]
    out_channels: int
    num_outs: int
    kernel_size: int = 1
    gn_num_groups: int = 32


@dataclass(frozen=True)
class TransformerConfig:
    embed_dims: int
    num_levels: int
    encoder_layers: int
    decoder_layers: int
    msda_heads: int
    msda_points: int
    self_attn_heads: int
    ffn_channels: int
    num_co_heads: int = 2


@dataclass(frozen=True)
class HeadConfig:
    num_query: int
    num_classes: int
    max_per_img: int
    num_reg_fcs: int = 2
    downsample_gn_num_groups: int = 32
    pos_num_feats: int = 128
    pos_temperature: float = 20.0
    pos_scale: float = 6.283185307179586
    pos_offset: float = 0.0
    pos_eps: float = 1e-6


@dataclass(frozen=True)
class CoDinoConfig:
    name: str
    backbone: SwinConfig
    neck: NeckConfig
    transformer: TransformerConfig
    head: HeadConfig


def _full_model() -> dict[str, Any]:
    """Co-DINO 5-scale Swin-L (o365->coco), facts from shared/spec/model_facts.md."""
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


def _get(section: dict[str, Any], where: str, key: str, default: Any = ...,
         kind: type = int) -> Any:
    if key not in section:
        if default is ...:
            raise ConfigError(f"config field '{where}.{key}' is missing")
        return default
    value = section[key]
    if kind is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, int) for v in value):
            raise ConfigError(f"config field '{where}.{key}' must be a list of ints, got {value!r}")
        return tuple(value)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config field '{where}.{key}' must be {kind.__name__}, got {value!r}")
    return value


def _section(raw: dict[str, Any], key: str, expected_type: str) -> dict[str, Any]:
    section = raw.get(key)
    if not isinstance(section, dict):
        raise ConfigError(f"config section '{key}' is missing or not an object")
    if section.get("type", expected_type) != expected_type:
        raise ConfigError(f"config field '{key}.type' must be '{expected_type}' "
                          f"(the only one implemented), got {section['type']!r}")
    return section


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def config_source(config: dict[str, Any] | str | Path) -> tuple[str, dict[str, Any]]:
    """(name, the dict as written) of a built-in name, a .json path or a dict: what an engine's
    manifest records as `config_name` and `config`."""
    if isinstance(config, str) and config in BUILTIN:
        return config, BUILTIN[config]()
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    return str(config.get("name", "custom")), config


def parse_config(config: dict[str, Any] | str | Path) -> CoDinoConfig:
    """Turn a built-in name, a JSON file path or a parsed dict into a checked `CoDinoConfig`."""
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

    b = _section(config, "backbone", "SwinTransformer")
    patch = _get(b, "backbone", "patch_size", 4)
    num_stages = len(_get(b, "backbone", "depths", kind=tuple))
    _check(not b.get("use_abs_pos_embed", False),
           "backbone.use_abs_pos_embed=true is not supported")
    _check(b.get("patch_norm", True), "backbone.patch_norm=false is not supported")
    backbone = SwinConfig(
        embed_dims=_get(b, "backbone", "embed_dims"),
        depths=_get(b, "backbone", "depths", kind=tuple),
        num_heads=_get(b, "backbone", "num_heads", kind=tuple),
        window_size=_get(b, "backbone", "window_size"),
        patch_size=patch,
        strides=_get(b, "backbone", "strides", (patch,) + (2,) * (num_stages - 1), kind=tuple),
        mlp_ratio=_get(b, "backbone", "mlp_ratio", 4.0, kind=float),
        qkv_bias=_get(b, "backbone", "qkv_bias", True, kind=bool),
        in_channels=_get(b, "backbone", "in_channels", 3),
        out_indices=_get(b, "backbone", "out_indices", tuple(range(num_stages)), kind=tuple),
    )
    stages = len(backbone.depths)
    _check(len(backbone.num_heads) == stages and len(backbone.strides) == stages,
           "backbone.depths, num_heads and strides must have one entry per stage")
    _check(backbone.strides[0] == backbone.patch_size, "backbone.strides[0] must equal patch_size")
    _check(backbone.in_channels == 3, "backbone.in_channels must be 3 (RGB input)")
    _check(all(0 <= i < stages for i in backbone.out_indices), "backbone.out_indices out of range")
    for i, heads in enumerate(backbone.num_heads):
        _check(backbone.stage_channels[i] % heads == 0,
               f"backbone stage {i}: {backbone.stage_channels[i]} channels not divisible by "
               f"{heads} heads")

    n = _section(config, "neck", "ChannelMapper")
    neck = NeckConfig(
        in_channels=_get(n, "neck", "in_channels", kind=tuple),
        out_channels=_get(n, "neck", "out_channels"),
        num_outs=_get(n, "neck", "num_outs"),
        kernel_size=_get(n, "neck", "kernel_size", 1),
        gn_num_groups=_get(n, "neck", "gn_num_groups", 32),
    )
    expected = tuple(backbone.stage_channels[i] for i in backbone.out_indices)
    _check(neck.in_channels == expected,
           f"neck.in_channels {list(neck.in_channels)} must equal the backbone's output channels "
           f"{list(expected)}")
    _check(neck.num_outs >= len(neck.in_channels), "neck.num_outs must be >= len(in_channels)")

    t = _section(config, "transformer", "CoDinoTransformer")
    transformer = TransformerConfig(
        embed_dims=_get(t, "transformer", "embed_dims"),
        num_levels=_get(t, "transformer", "num_feature_levels"),
        encoder_layers=_get(t, "transformer", "encoder_layers"),
        decoder_layers=_get(t, "transformer", "decoder_layers"),
        msda_heads=_get(t, "transformer", "msda_heads"),
        msda_points=_get(t, "transformer", "msda_points"),
        self_attn_heads=_get(t, "transformer", "decoder_self_attn_heads"),
        ffn_channels=_get(t, "transformer", "ffn_channels"),
        num_co_heads=_get(t, "transformer", "num_co_heads", 2),
    )
    d = transformer.embed_dims
    _check(t.get("msda_levels", transformer.num_levels) == transformer.num_levels == neck.num_outs,
           "transformer.num_feature_levels, msda_levels and neck.num_outs must be equal")
    _check(neck.out_channels == d, "neck.out_channels must equal transformer.embed_dims")
    _check(d % transformer.msda_heads == 0 and d % transformer.self_attn_heads == 0,
           "transformer.embed_dims must be divisible by msda_heads and decoder_self_attn_heads")
    _check(d % 2 == 0, "transformer.embed_dims must be even (sine encoding)")

    h = _section(config, "head", "CoDINOHead")
    num_classes = _get(h, "head", "num_classes", config.get("num_classes", ...))
    head = HeadConfig(
        num_query=_get(h, "head", "num_query"),
        num_classes=num_classes,
        max_per_img=_get(h, "head", "max_per_img"),
        num_reg_fcs=_get(h, "head", "num_reg_fcs", 2),
        downsample_gn_num_groups=_get(h, "head", "downsample_gn_num_groups", 32),
        pos_num_feats=_get(h, "head", "pos_num_feats", d // 2),
        pos_temperature=_get(h, "head", "pos_temperature", 20.0, kind=float),
        pos_scale=_get(h, "head", "pos_scale", 6.283185307179586, kind=float),
        pos_offset=_get(h, "head", "pos_offset", 0.0, kind=float),
        pos_eps=_get(h, "head", "pos_eps", 1e-6, kind=float),
    )
    _check(h.get("pos_normalize", True), "head.pos_normalize=false is not supported")
    _check(2 * head.pos_num_feats == d, "head.pos_num_feats must be transformer.embed_dims / 2")
    _check(t.get("two_stage_num_proposals", head.num_query) == head.num_query,
           "transformer.two_stage_num_proposals must equal head.num_query")
    _check(h.get("num_pred_branches", transformer.decoder_layers + 1)
           == transformer.decoder_layers + 1, "head.num_pred_branches must be decoder_layers + 1")
    _check(head.max_per_img <= head.num_query * head.num_classes,
           "head.max_per_img must be <= num_query * num_classes")
    return CoDinoConfig(name=str(config.get("name", "custom")), backbone=backbone, neck=neck,
                        transformer=transformer, head=head)
