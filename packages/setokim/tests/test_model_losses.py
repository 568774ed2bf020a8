"""Stage II/III loss pieces on random tensors (no tokenizer or LLM needed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from setokim.model.losses import embedding_regression_loss, next_token_loss
from setokim.model.packing import IGNORE_INDEX, Packed


def test_next_token_loss_shifts_and_ignores():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 2], labels[1, 4], labels[1, 0] = 3, 7, 9  # [1,0] can never be predicted
    loss, count = next_token_loss(logits, labels)
    manual = (
        F.cross_entropy(logits[0, 1:2], torch.tensor([3]))
        + F.cross_entropy(logits[1, 3:4], torch.tensor([7]))
    ) / 2
    assert count == 2
    torch.testing.assert_close(loss, manual)


def test_next_token_loss_without_labels_is_zero_with_grad():
    logits = torch.randn(1, 4, 6, requires_grad=True)
    loss, count = next_token_loss(logits, torch.full((1, 4), IGNORE_INDEX))
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def _packed(vb, vt, vout) -> Packed:
    z = torch.zeros(1)
    return Packed(z, z, z, z, z, torch.tensor(vb), torch.tensor(vt), z, torch.tensor(vout), z)


def test_regression_uses_previous_hidden_state_and_output_tokens_only():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 4, generator=g, requires_grad=True)
    tokens = torch.randn(3, 2, 5, generator=g)
    mask = torch.tensor([[True, False], [True, True], [True, True]])
    # visual tokens in packed order: image0 tok0 | image1 tok0,1 | image2 tok0,1
    packed = _packed([0, 1, 1, 0, 0], [1, 2, 3, 3, 4], [False, True, True, False, False])
    head = nn.Linear(4, 5)
    loss, count = embedding_regression_loss(hidden, head, packed, tokens, mask)
    assert count == 2
    pred = head(hidden[torch.tensor([1, 1]), torch.tensor([1, 2])])
    torch.testing.assert_close(loss, F.mse_loss(pred, tokens[1]))
    loss.backward()
    assert hidden.grad[1, 1].abs().sum() > 0 and hidden.grad[0].abs().sum() == 0


def test_regression_without_output_images_is_zero():
    head = nn.Linear(4, 5)
    packed = _packed([0], [1], [False])
    loss, count = embedding_regression_loss(
        torch.randn(1, 3, 4), head, packed, torch.randn(1, 1, 5), torch.ones(1, 1, dtype=torch.bool)
    )
    assert count == 0 and loss.item() == 0.0
