"""LLM prefill FLOPs per sample, counted from a decoder config (Llama-style blocks).

Per layer, for a sequence of L tokens, hidden size h, k/v width h_kv = h * kv_heads / heads,
intermediate size i (a gated MLP has three matrices, a plain one two):

    projections  2 L h (h + 2 h_kv) + 2 L h h      (q, k, v, o)
    attention    2 L^2 h (scores) + 2 L^2 h (weighted values), halved when `causal`
    mlp          2 L h i * (3 if gated else 2)

plus the LM head 2 h V on the last position only (prefill needs one next-token distribution)
or on all L positions with `lm_head="all"`. A multiply-add counts as 2 FLOPs; norms, softmax
and activations are ignored (they are O(L h)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_KEYS = {
    "hidden": ("hidden", "hidden_size", "d_model", "n_embd"),
    "layers": ("layers", "num_hidden_layers", "n_layer", "num_layers"),
    "intermediate": ("intermediate", "intermediate_size", "ffn_dim", "n_inner"),
    "heads": ("heads", "num_attention_heads", "n_head"),
    "kv_heads": ("kv_heads", "num_key_value_heads"),
    "vocab": ("vocab", "vocab_size"),
}


def _get(config: Mapping[str, Any], field: str, required: bool = True) -> int | None:
    for key in _KEYS[field]:
        if key in config and config[key] is not None:
            value = int(config[key])
            if value <= 0:
                raise ValueError(f"config[{key!r}] must be positive, got {value}")
            return value
    if required:
        raise KeyError(f"config needs one of {_KEYS[field]} (for {field})")
    return None


def prefill_flops(
    config: Mapping[str, Any],
    seq_len: int,
    *,
    gated_mlp: bool = True,
    causal: bool = False,
    lm_head: str = "last",
) -> float:
    """FLOPs of one prefill forward pass over `seq_len` tokens."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if lm_head not in ("last", "all", "none"):
        raise ValueError(f"lm_head must be 'last', 'all' or 'none', got {lm_head!r}")
    h, n_layers = _get(config, "hidden"), _get(config, "layers")
    inter, heads, vocab = _get(config, "intermediate"), _get(config, "heads"), _get(config, "vocab")
    kv_heads = _get(config, "kv_heads", required=False) or heads
    if h % heads:
        raise ValueError(f"hidden ({h}) must be divisible by heads ({heads})")
    L = float(seq_len)
    h_kv = h * kv_heads / heads
    proj = 2 * L * h * (h + 2 * h_kv) + 2 * L * h * h
    attn = 4 * L * L * h * (0.5 if causal else 1.0)
    mlp = 2 * L * h * inter * (3 if gated_mlp else 2)
    head = {"last": 2 * h * vocab, "all": 2 * L * h * vocab, "none": 0.0}[lm_head]
    return float(n_layers * (proj + attn + mlp) + head)


def prefill_flops_per_sample(
    config: Mapping[str, Any],
    text_tokens: int | Sequence[int],
    visual_tokens: int | Sequence[int],
    **kwargs: Any,
) -> list[float]:
    """Per-sample prefill FLOPs with sequence length = text tokens + visual tokens; scalars
    broadcast against lists."""
    t = [text_tokens] if isinstance(text_tokens, int) else list(text_tokens)
    v = [visual_tokens] if isinstance(visual_tokens, int) else list(visual_tokens)
    n = max(len(t), len(v))
    if len(t) not in (1, n) or len(v) not in (1, n):
        raise ValueError(f"text_tokens ({len(t)}) and visual_tokens ({len(v)}) lengths differ")
    t, v = t * (n // len(t)), v * (n // len(v))
    return [prefill_flops(config, int(a) + int(b), **kwargs) for a, b in zip(t, v, strict=True)]
