"""TrainerConfig.lr_groups: a learning rate per parameter group (paper Table 7's Stage I
rates, the encoder's own), on the same warmup/cosine schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from setokim.train.config import TrainerConfig
from setokim.train.optim import build_optimizer
from setokim.train.schedule import build_scheduler


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {"encoder": nn.Linear(4, 4), "merger": nn.Linear(4, 4), "head": nn.Linear(4, 2)}
    )


def test_two_groups_get_their_rates_and_share_the_schedule() -> None:
    model = _model()
    cfg = TrainerConfig(lr=4e-3, lr_groups={"encoder.*": 1e-3, "head.weight": 2e-3})
    opt = build_optimizer(model, list(model.parameters()), cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert opt.param_groups[0]["name"] == "rest"  # the base rate the loop logs
    assert by_name["rest"]["lr"] == pytest.approx(4e-3)
    assert by_name["encoder.*"]["lr"] == pytest.approx(1e-3)
    assert by_name["head.weight"]["lr"] == pytest.approx(2e-3)
    assert {id(p) for p in by_name["encoder.*"]["params"]} == {
        id(p) for p in model["encoder"].parameters()
    }
    assert len(by_name["rest"]["params"]) == 3  # merger weight/bias, head bias
    sched = build_scheduler(opt, warmup_steps=2, max_steps=10, min_lr_ratio=0.0)
    # step 0 of a 2-step warmup: every group at half its own rate
    assert by_name["encoder.*"]["lr"] == pytest.approx(0.5e-3)
    assert by_name["rest"]["lr"] == pytest.approx(2e-3)
    for _ in range(6):
        opt.step()
        sched.step()
    assert by_name["encoder.*"]["lr"] / by_name["rest"]["lr"] == pytest.approx(1e-3 / 4e-3)


def test_defaults_keep_one_group_at_lr() -> None:
    model = _model()
    opt = build_optimizer(model, list(model.parameters()), TrainerConfig(lr=5e-4))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_a_glob_that_matches_nothing_is_an_error_naming_it() -> None:
    model = _model()
    model["encoder"].requires_grad_(False)  # a frozen encoder: the glob has nothing to train
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"\['encoder\.\*'\] match no trainable parameter"):
        build_optimizer(model, params, TrainerConfig(lr_groups={"encoder.*": 1e-3}))
    with pytest.raises(ValueError, match=r"\['setok\.encoder\.\*'\]"):
        build_optimizer(model, params, TrainerConfig(lr_groups={"setok.encoder.*": 1e-3}))


def test_overlapping_globs_and_bad_rates_are_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match="'head.weight' matches"):
        build_optimizer(
            model,
            list(model.parameters()),
            TrainerConfig(lr_groups={"head.*": 1.0, "*.weight": 2.0}),
        )
    with pytest.raises(ValueError, match=r"lr_groups\['encoder\.\*'\]: must be > 0"):
        TrainerConfig(lr_groups={"encoder.*": 0.0})
