"""Stage III exports: LoRA adapters + trained heads over a hash-checked base export, a merged
self-contained alternative, and clear errors when the base is missing, moved or changed."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from setokim.model import export
from setokim.model.config import LoRAConfig, SeTokIMConfig
from setokim.model.lora import apply_lora
from setokim.model.packing import Image, Sample, Text
from setokim.model.setokim import SeTokIM

LORA = LoRAConfig(
    enabled=True, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
    train_heads=["projector"],
)  # fmt: skip


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 64, 64, generator=g)
    return [
        Sample([Text("a b c", train=True)]),
        Sample([Text("look"), Image(0), Text("then"), Image(1, output=True)], imgs),
    ]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stage II-like full export of a tiny model whose weights differ from a fresh build."""
    cfg = SeTokIMConfig()
    cfg.tokenizer.clustering.max_clusters = 8
    model = SeTokIM.from_config(cfg)
    with torch.no_grad():
        model.regression_head[0].bias.add_(0.25)
        model.llm.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    return model.save_pretrained(tmp_path_factory.mktemp("lora_export") / "s2")


def _lora_model(base: Path) -> SeTokIM:
    """Stage III as `Stage3Stage.build_model` makes it, with non-zero adapters and a moved head."""
    model = SeTokIM.from_pretrained(base)
    apply_lora(model, LORA)
    model.config = replace(model.config, lora=LORA)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("projector."):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def lora_model(base_dir: Path) -> SeTokIM:
    return _lora_model(base_dir)


def _logits(model: SeTokIM) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(model.collate(_samples())).logits


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def test_adapter_export_is_small_and_holds_no_llm_weights(base_dir, lora_model, tmp_path):
    out = lora_model.save_pretrained(tmp_path / "s3")
    assert export.is_adapter_export(out)
    assert not (out / export.WEIGHTS_FILE).exists() and not (out / "setok").exists()
    adapters = load_file(str(out / export.ADAPTER_FILE))
    heads = load_file(str(out / export.HEADS_FILE))
    assert adapters and all("lora_" in k for k in adapters)
    n_lora = sum(1 for n, _ in lora_model.named_parameters() if "lora_" in n)
    assert len(adapters) == n_lora
    assert set(heads) == {k for k in lora_model.state_dict() if k.startswith("projector.")}
    base_keys = set(load_file(str(base_dir / export.WEIGHTS_FILE)))
    llm_keys = {k for k in base_keys if k.startswith("llm.")}
    assert llm_keys and not (llm_keys & set(heads))
    assert not ({k.removeprefix("llm.") for k in llm_keys} & set(adapters))
    assert all(LORA.rank in v.shape for v in adapters.values())  # low-rank factors only
    info = json.loads((out / export.BASE_FILE).read_text())
    assert info["base"] == str(base_dir.resolve())
    assert info["weights_sha256"] == export.weights_sha256(base_dir)
    assert "setok/model.safetensors" in info["weights_sha256"]
    merged = lora_model.save_pretrained(tmp_path / "merged", full=True)
    weights = lambda d: sum(p.stat().st_size for p in d.rglob("*.safetensors"))  # noqa: E731
    assert weights(out) * 10 < weights(merged)
    assert _size(out) < _size(merged)


def test_adapter_round_trip_equals_the_in_memory_model(lora_model, tmp_path):
    out = lora_model.save_pretrained(tmp_path / "s3")
    loaded = SeTokIM.from_pretrained(out)
    assert loaded.config.lora == LORA
    assert loaded.base_export == lora_model.base_export
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    torch.testing.assert_close(_logits(loaded), _logits(lora_model), rtol=0, atol=0)
    # a loaded adapter export saves again as an adapter export over the same base
    again = loaded.save_pretrained(tmp_path / "again")
    assert json.loads((again / export.BASE_FILE).read_text())["base"] == str(loaded.base_export)


def test_merged_export_is_self_contained_and_equal(lora_model, tmp_path):
    out = lora_model.save_pretrained(tmp_path / "merged", full=True)
    assert not export.is_adapter_export(out)
    merged = SeTokIM.from_pretrained(out)
    assert not merged.config.lora.enabled
    assert not any("lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged), _logits(lora_model), rtol=1e-4, atol=1e-5)
    assert lora_model.config.lora.enabled  # merging left the live model alone
    # the CLI merges an adapter export the same way
    adapter = lora_model.save_pretrained(tmp_path / "s3")
    assert export.main(["merge", str(adapter), str(tmp_path / "cli")]) == 0
    torch.testing.assert_close(
        _logits(SeTokIM.from_pretrained(tmp_path / "cli")), _logits(merged), rtol=0, atol=1e-6
    )


def test_missing_moved_or_changed_base_fails_naming_it(base_dir, tmp_path):
    copy_dir = tmp_path / "base_copy"
    shutil.copytree(base_dir, copy_dir)
    model = _lora_model(copy_dir)
    out = model.save_pretrained(tmp_path / "s3")
    moved = tmp_path / "moved_base"
    copy_dir.rename(moved)
    with pytest.raises(FileNotFoundError, match=str(copy_dir.resolve())):
        SeTokIM.from_pretrained(out)
    loaded = SeTokIM.from_pretrained(out, base=moved)  # pointing at the moved base works
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)

    weights = load_file(str(moved / export.WEIGHTS_FILE))
    weights["llm.lm_head.weight"] = weights["llm.lm_head.weight"] * 1.01
    save_file(weights, str(moved / export.WEIGHTS_FILE))
    with pytest.raises(ValueError, match=rf"{moved}.*not the ones it was trained on"):
        SeTokIM.from_pretrained(out, base=moved)


def test_relative_base_is_read_from_the_adapter_dir(base_dir, tmp_path):
    pair = tmp_path / "run"
    shutil.copytree(base_dir, pair / "stage2")
    model = _lora_model(pair / "stage2")
    out = model.save_pretrained(pair / "stage3", base="../stage2")
    assert json.loads((out / export.BASE_FILE).read_text())["base"] == "../stage2"
    pair.rename(tmp_path / "elsewhere")  # the pair moves together
    loaded = SeTokIM.from_pretrained(tmp_path / "elsewhere" / "stage3")
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_save_refuses_what_an_adapter_export_would_lose(base_dir, lora_model, tmp_path):
    model = _lora_model(base_dir)
    with torch.no_grad():
        model.regression_head[0].bias.add_(1.0)  # trained outside adapters and train_heads
    with pytest.raises(ValueError, match=r"regression_head\.0\.bias.*full=True"):
        model.save_pretrained(tmp_path / "lost")
    assert not (tmp_path / "lost").exists()
    fresh = SeTokIM.from_config(replace(lora_model.config, lora=LoRAConfig()))
    apply_lora(fresh, LORA)
    fresh.config = replace(fresh.config, lora=LORA)
    with pytest.raises(ValueError, match="base="):
        fresh.save_pretrained(tmp_path / "nobase", full=False)
    # without a known base the export stays self-contained (adapters unmerged), as before
    out = fresh.save_pretrained(tmp_path / "nobase")
    assert (out / export.WEIGHTS_FILE).is_file() and not export.is_adapter_export(out)
    torch.testing.assert_close(_logits(SeTokIM.from_pretrained(out)), _logits(fresh))
    with pytest.raises(ValueError, match="base="):
        lora_model.save_pretrained(tmp_path / "x", full=True, base=base_dir)
    with pytest.raises(ValueError, match="full export"):
        SeTokIM.from_pretrained(base_dir, base=base_dir)
    with pytest.raises(FileNotFoundError, match="missing_base"):
        lora_model.save_pretrained(tmp_path / "y", base=tmp_path / "missing_base")


def _shard(full: Path, out: Path) -> Path:
    """`full` as a sharded export (two shards and the transformers index), as Stage II on
    two ranks writes it."""
    from setokim.model.sharded import INDEX_FILE, assign_shards, shard_name

    top = lambda d, names: [export.WEIGHTS_FILE] if Path(d) == full else []  # noqa: E731
    shutil.copytree(full, out, ignore=top)
    state = load_file(str(full / export.WEIGHTS_FILE))
    groups = assign_shards({k: v.numel() * v.element_size() for k, v in state.items()}, 2)
    for i, names in enumerate(groups):
        save_file({n: state[n] for n in names}, str(out / shard_name(i, 2)))
    weight_map = {n: shard_name(i, 2) for i, names in enumerate(groups) for n in names}
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_adapter_export_over_a_sharded_base(base_dir, tmp_path):
    sharded = _shard(base_dir, tmp_path / "s2_sharded")
    ours, want = (SeTokIM.from_pretrained(d).state_dict() for d in (sharded, base_dir))
    assert set(ours) == set(want) and all(torch.equal(ours[k], want[k]) for k in want)
    model = _lora_model(sharded)
    out = model.save_pretrained(tmp_path / "s3")  # the base check reads both shards
    info = json.loads((out / export.BASE_FILE).read_text())
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= set(
        info["weights_sha256"]
    )
    loaded = SeTokIM.from_pretrained(out)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)

    with torch.no_grad():  # a weight outside the adapters, in whichever shard holds it
        model.llm.lm_head.weight.mul_(1.01)
    with pytest.raises(ValueError, match=r"llm\.lm_head\.weight.*full=True"):
        model.save_pretrained(tmp_path / "lost")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        SeTokIM.from_pretrained(out)
