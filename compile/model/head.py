"""CoDINOHead at inference: level masks and positional encodings, the transformer, the
classification/regression branches and the top-k output.

`cls_branches`/`reg_branches` hold decoder_layers + 1 entries: one per decoder layer and the
last for two-stage selection. `downsample` is training-only (auxiliary heads) and kept for keys.
"""

from __future__ import annotations

from codetr_stream.compile.model.decoder import inverse_sigmoid
from codetr_stream.compile.model.masks import level_masks
from codetr_stream.compile.model.position import SinePositionalEncoding
from codetr_stream.compile.model.topk import topk_detections
from codetr_stream.compile.model.transformer import CoDinoTransformer
from codetr_stream.compile.model_config import HeadConfig, TransformerConfig
from torch import Tensor, nn


def reg_branch(dims: int, num_fcs: int) -> nn.Sequential:
    """`num_fcs` x (Linear, ReLU), then Linear(dims, 4): keys 0, 2, 4 for two hidden layers."""
    layers: list[nn.Module] = []
    for _ in range(num_fcs):
        layers += [nn.Linear(dims, dims), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(dims, 4))


class CoDINOHead(nn.Module):
    def __init__(self, cfg: HeadConfig, tcfg: TransformerConfig) -> None:
        super().__init__()
        d, branches = tcfg.embed_dims, tcfg.decoder_layers + 1
        self.max_per_img = cfg.max_per_img
        self.positional_encoding = SinePositionalEncoding(
            cfg.pos_num_feats, cfg.pos_temperature, cfg.pos_scale, cfg.pos_offset, cfg.pos_eps)
        self.transformer = CoDinoTransformer(tcfg, cfg.num_query)
        self.cls_branches = nn.ModuleList(nn.Linear(d, cfg.num_classes) for _ in range(branches))
        self.reg_branches = nn.ModuleList(reg_branch(d, cfg.num_reg_fcs) for _ in range(branches))
        self.downsample = nn.Sequential(nn.Conv2d(d, d, 3, stride=2, padding=1),
                                        nn.GroupNorm(cfg.downsample_gn_num_groups, d))

    def forward(self, feats: list[Tensor], image_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """feats (B,C,h,w) per level, image_mask (B,H,W) True = padding -> boxes, scores, labels."""
        masks = level_masks(image_mask, feats)
        pos = [self.positional_encoding(m, f.dtype) for m, f in zip(masks, feats, strict=True)]
        state, reference, _ = self.transformer(feats, masks, pos, self.cls_branches,
                                               self.reg_branches)
        last = len(self.transformer.decoder.layers) - 1
        cls_logits = self.cls_branches[last](state)
        boxes = (self.reg_branches[last](state) + inverse_sigmoid(reference)).sigmoid()
        return topk_detections(cls_logits, boxes, image_mask, self.max_per_img)
