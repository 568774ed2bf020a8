"""The feature mapper: a Q-Former turning a variable number of SeTok tokens into the
U-Net's fixed-length conditioning sequence (B, num_queries, cross_attention_dim).

Learnable queries self-attend and cross-attend to the tokens in every layer
(transformers' Blip2QFormerModel); padded tokens are hidden by the key padding mask.
Like BLIP-2, the self-attention and FFN weights can start from a BERT checkpoint (a local
directory); cross-attention starts random.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from setok_decoders.config import MapperConfig

# BERT layer key -> Q-Former layer key (the query branch of each layer)
_BERT_TO_QFORMER = {
    "attention.self.": "attention.attention.",
    "attention.output.": "attention.output.",
    "intermediate.": "intermediate_query.",
    "output.": "output_query.",
}


def check_tokens(tokens: Tensor, token_mask: Tensor, token_dim: int | None = None) -> None:
    """Validate a padded token batch: (B, K, d) tokens, (B, K) mask, >= 1 token per image."""
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, K, d), got shape {tuple(tokens.shape)}")
    if token_dim is not None and tokens.shape[-1] != token_dim:
        raise ValueError(f"tokens must have width {token_dim}, got {tokens.shape[-1]}")
    if token_mask.shape != tokens.shape[:2]:
        raise ValueError(
            f"token_mask must have shape {tuple(tokens.shape[:2])}, got {tuple(token_mask.shape)}"
        )
    empty = (~token_mask.bool()).all(-1).nonzero().flatten()
    if len(empty):
        raise ValueError(f"token_mask has no valid token at batch index {empty[0].item()}")


class FeatureMapper(nn.Module):
    """Q-Former: (tokens (B, K, d), token_mask (B, K)) -> (B, num_queries, out_dim)."""

    def __init__(self, config: MapperConfig, out_dim: int) -> None:
        super().__init__()
        bert_state = None
        if config.bert_path is not None:
            config, bert_state = _read_bert(config)
        self.config = config
        qcfg = Blip2QFormerConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
            cross_attention_frequency=config.cross_attention_frequency,
            encoder_hidden_size=config.token_dim,
        )
        self.qformer = Blip2QFormerModel(qcfg)
        self.queries = nn.Parameter(torch.randn(1, config.num_queries, config.hidden_size) * 0.02)
        self.proj = nn.Linear(config.hidden_size, out_dim)
        if bert_state is not None:
            self._load_bert(bert_state)

    def forward(self, tokens: Tensor, token_mask: Tensor) -> Tensor:
        check_tokens(tokens, token_mask, self.config.token_dim)
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=tokens,
            encoder_attention_mask=token_mask.long(),
        ).last_hidden_state
        return self.proj(out)

    def _load_bert(self, bert_state: dict[str, Tensor]) -> None:
        mapped: dict[str, Tensor] = {}
        for key, value in bert_state.items():
            if key.startswith("embeddings.LayerNorm."):
                mapped["layernorm." + key.removeprefix("embeddings.LayerNorm.")] = value
                continue
            if not key.startswith("encoder.layer."):
                continue
            idx, rest = key.removeprefix("encoder.layer.").split(".", 1)
            if int(idx) >= self.config.num_layers:
                continue
            for src, dst in _BERT_TO_QFORMER.items():
                if rest.startswith(src):
                    mapped[f"encoder.layer.{idx}.{dst}{rest.removeprefix(src)}"] = value
                    break
        result = self.qformer.load_state_dict(mapped, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"BERT weights do not fit the Q-Former: {result.unexpected_keys[:5]}")
        self.loaded_from_bert = sorted(mapped)


def _read_bert(config: MapperConfig) -> tuple[MapperConfig, dict[str, Tensor]]:
    """Load a local BERT; the mapper's sizes follow the checkpoint's."""
    from transformers import BertModel

    bert = BertModel.from_pretrained(config.bert_path, local_files_only=True)
    bcfg = bert.config
    if bcfg.num_hidden_layers < config.num_layers:
        raise ValueError(
            f"mapper.num_layers={config.num_layers} exceeds the BERT checkpoint's "
            f"{bcfg.num_hidden_layers} layers"
        )
    resolved = dataclasses.replace(
        config,
        hidden_size=bcfg.hidden_size,
        num_heads=bcfg.num_attention_heads,
        intermediate_size=bcfg.intermediate_size,
    )
    state = {k.removeprefix("bert."): v.detach().clone() for k, v in bert.state_dict().items()}
    return resolved, state
