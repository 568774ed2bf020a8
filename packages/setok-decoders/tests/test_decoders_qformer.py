"""The Q-Former feature mapper: shapes, key padding, BERT initialisation."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from setok_decoders.config import MapperConfig
from setok_decoders.qformer import FeatureMapper


def _mapper(**kw) -> FeatureMapper:
    torch.manual_seed(0)
    return FeatureMapper(MapperConfig(token_dim=24, num_queries=6, **kw), out_dim=40).eval()


def test_output_shape_and_padding_invariance():
    mapper = _mapper()
    tokens = torch.randn(3, 7, 24)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]]).bool()
    out = mapper(tokens, mask)
    assert out.shape == (3, 6, 40)
    changed = tokens.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 24) * 100
    assert torch.allclose(mapper(changed, mask), out, atol=1e-5)
    # but a valid token does matter
    changed[1, 0] += 1.0
    assert not torch.allclose(mapper(changed, mask)[1], out[1], atol=1e-4)
    # and padding is equivalent to dropping the padded slots
    assert torch.allclose(mapper(tokens[1:2, :3], mask[1:2, :3]), out[1:2], atol=1e-5)


def test_rejects_bad_tokens():
    mapper = _mapper()
    with pytest.raises(ValueError, match="batch index 1"):
        mapper(torch.randn(2, 3, 24), torch.tensor([[1, 0, 0], [0, 0, 0]]).bool())
    with pytest.raises(ValueError, match="width 24"):
        mapper(torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask"):
        mapper(torch.randn(2, 3, 24), torch.ones(2, 4, dtype=torch.bool))


def test_init_from_local_bert(tmp_path):
    torch.manual_seed(1)
    bert = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=4,
            intermediate_size=48,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    mapper = _mapper(num_layers=4, bert_path=str(tmp_path / "bert"))
    assert mapper.config.hidden_size == 32 and mapper.config.intermediate_size == 48
    q = mapper.qformer.encoder.layer
    b = bert.encoder.layer
    assert torch.equal(q[3].attention.attention.query.weight, b[3].attention.self.query.weight)
    assert torch.equal(q[0].intermediate_query.dense.weight, b[0].intermediate.dense.weight)
    assert torch.equal(q[2].output_query.LayerNorm.bias, b[2].output.LayerNorm.bias)
    assert torch.equal(mapper.qformer.layernorm.weight, bert.embeddings.LayerNorm.weight)
    assert len(mapper.loaded_from_bert) == 2 + 4 * 16
    out = mapper(torch.randn(2, 3, 24), torch.ones(2, 3, dtype=torch.bool))
    assert out.shape == (2, 6, 40) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="num_layers"):
        _mapper(num_layers=6, bert_path=str(tmp_path / "bert"))
