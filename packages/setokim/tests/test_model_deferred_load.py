"""A Stage II export loaded with its LLM left on the meta device (`defer_llm`, what Stage III
does before FSDP2 shards it), in one process: LoRA over the meta LLM starts as over loaded
weights, filling the meta tensors gives the export's values, and an export whose tensor has
another shape is refused naming that tensor, before and while filling."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from setokim.model.build import build_tiny_setokim
from setokim.model.config import LoRAConfig, SeTokIMConfig
from setokim.model.lora import apply_lora
from setokim.model.sharded import load_export_on_meta, materialise_from_export

BAD = "llm.model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deferred") / "export"
    build_tiny_setokim(replace(SeTokIMConfig(), seed=3), with_decoders=False).save_pretrained(out)
    return out


def _with_lora(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(11)
    return apply_lora(model, LoRAConfig(enabled=True, rank=4))


def test_meta_llm_gets_real_adapters_and_the_exported_weights(export: Path) -> None:
    whole = _with_lora(load_export_on_meta(export))
    deferred = _with_lora(load_export_on_meta(export, defer_llm=True))
    meta = [n for n, p in deferred.named_parameters() if p.is_meta]
    assert meta and all(n.startswith("llm.") and "lora_" not in n for n in meta)
    assert not deferred.projector[0].weight.is_meta  # the rest is loaded
    read = materialise_from_export(deferred, export)
    assert read == sum(p.numel() * p.element_size() for n, p in whole.named_parameters()
                       if n in meta)  # fmt: skip
    got, want = deferred.state_dict(), whole.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():  # adapters: the same draws as over loaded weights
        assert torch.equal(got[key], value), key
    assert [n for n, p in deferred.named_parameters() if p.requires_grad] == [
        n for n, p in whole.named_parameters() if p.requires_grad
    ]


def test_a_tensor_of_another_shape_is_refused_by_name(export: Path, tmp_path: Path) -> None:
    deferred = load_export_on_meta(export, defer_llm=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    for item in export.iterdir():
        if item.name != "model.safetensors":
            (bad / item.name).symlink_to(item)
    state = load_file(str(export / "model.safetensors"))
    state[BAD] = state[BAD][:-1].clone()
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=BAD):
        load_export_on_meta(bad, defer_llm=True)  # from the file's header, nothing read
    with pytest.raises(ValueError, match=BAD):
        materialise_from_export(deferred, bad)
