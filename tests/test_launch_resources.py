"""The launch plan's resource estimate: meta-device builds, memory terms against a measured
CPU peak, FLOPs, and the refusal of a plan that does not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from setok_experiments.resources import (
    FusedAttention,
    measure_step,
    memory_terms,
)
from setokim.train.parallel import apply_activation_checkpointing

VOCAB, HIDDEN, LAYERS, BATCH, SEQ = 256, 64, 3, 4, 96


def _llama(device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg)


def _loss_fn(model: nn.Module, device: str):
    def run() -> torch.Tensor:
        embeds = torch.zeros(BATCH, SEQ, HIDDEN, device=device)
        if device != "meta":
            embeds.normal_()
        mask = torch.ones(BATCH, 1, SEQ, SEQ, dtype=torch.bool, device=device).tril_()
        hidden = model.model(
            inputs_embeds=embeds, attention_mask=mask, use_cache=False
        ).last_hidden_state
        logits = model.lm_head(hidden)
        labels = torch.zeros(BATCH * (SEQ - 1), dtype=torch.long, device=device)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels)

    return run


def _measured_peak(checkpointing: bool) -> int:
    """Peak bytes of real tensors over a second AdamW step (states exist), fp32 on CPU."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model = _llama("cpu")
    if checkpointing:
        apply_activation_checkpointing(list(model.model.layers))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = _loss_fn(model, "cpu")
    with FusedAttention():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker, FusedAttention():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")
    return int(peak[torch.device("cpu")]["Total"])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_terms_match_a_measured_cpu_peak(checkpointing: bool) -> None:
    meta = _llama("meta")
    units = list(meta.model.layers)
    step = measure_step(meta, units, _loss_fn(meta, "meta"))
    terms = memory_terms(
        meta,
        units,
        list(meta.parameters()),
        step,
        world_size=1,
        fsdp=False,
        compute_dtype=None,
        activation_checkpointing=checkpointing,
    )
    n = sum(p.numel() for p in meta.parameters())
    assert (terms.params, terms.grads, terms.optimizer) == (4 * n, 4 * n, 8 * n)
    assert terms.activations_ac < terms.activations_no_ac
    measured = _measured_peak(checkpointing)
    assert abs(terms.total() - measured) / measured < 0.20, (terms, measured)


def test_saved_activations_grow_with_the_batch_and_flops_are_counted() -> None:
    meta = _llama("meta")
    units = list(meta.model.layers)
    step = measure_step(meta, units, _loss_fn(meta, "meta"))
    assert len(step.per_unit) == LAYERS and min(step.per_unit) > 0
    assert max(step.per_unit) < 1.1 * min(step.per_unit)  # identical layers, similar bytes
    # fused attention: no (SEQ x SEQ) float score matrix per head is saved
    scores = BATCH * 4 * SEQ * SEQ * 4
    assert step.per_unit[0] < scores + 40 * BATCH * SEQ * HIDDEN * 4
    # a forward is at least 2 FLOPs per weight per token; backward about twice that
    weights = sum(p.numel() for p in meta.model.layers.parameters())
    assert step.forward_flops >= 2 * weights * BATCH * SEQ
    assert 1.5 < step.backward_flops / step.forward_flops < 2.5
