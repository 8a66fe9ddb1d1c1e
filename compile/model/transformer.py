"""CoDinoTransformer: flatten the levels, encode, select queries, decode.

Also owns the parameters that only training uses (`aux_pos_trans*`), so that the state-dict keys
equal the official checkpoint's.
"""

from __future__ import annotations

import torch
from codetr_stream.compile.model.decoder import CoDinoDecoder
from codetr_stream.compile.model.encoder import DeformableEncoder
from codetr_stream.compile.model.masks import valid_ratios
from codetr_stream.compile.model.query_selection import encoder_proposals, select_queries
from codetr_stream.compile.model_config import TransformerConfig
from torch import Tensor, nn


class CoDinoTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, num_query: int) -> None:
        super().__init__()
        d = cfg.embed_dims
        self.num_query = num_query
        self.level_embeds = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        self.encoder = DeformableEncoder(cfg)
        self.decoder = CoDinoDecoder(cfg)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.query_embed = nn.Embedding(num_query, d)
        self.aux_pos_trans = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(cfg.num_co_heads))
        self.aux_pos_trans_norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(cfg.num_co_heads))
        nn.init.normal_(self.level_embeds)

    def forward(self, feats: list[Tensor], masks: list[Tensor], pos: list[Tensor],
                cls_branches: nn.ModuleList, reg_branches: nn.ModuleList
                ) -> tuple[Tensor, Tensor, Tensor]:
        """feats/pos (B,C,h,w) and masks (B,h,w) per level -> decoder output (B,Q,C) after the
        final norm, the last layer's input reference and the fully refined reference (B,Q,4)."""
        shapes = [(f.shape[2], f.shape[3]) for f in feats]
        tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        level_pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embeds[lvl]
                               for lvl, p in enumerate(pos)], 1)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1).to(tokens.dtype)
        memory = self.encoder(tokens, level_pos, mask, ratios, shapes)

        selection = len(self.decoder.layers)
        masked, proposals = encoder_proposals(memory, mask, masks, shapes)
        output_memory = self.enc_output_norm(self.enc_output(masked))
        enc_scores = cls_branches[selection](output_memory)
        enc_coords = reg_branches[selection](output_memory) + proposals
        reference = select_queries(enc_scores, enc_coords, self.num_query)
        query = self.query_embed.weight[None].expand(tokens.shape[0], -1, -1)
        return self.decoder(query, memory, mask, reference, ratios, shapes, reg_branches)
