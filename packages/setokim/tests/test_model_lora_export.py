"""Stage III exports: LoRA adapters + trained heads over a hash-checked base export, a merged
self-contained alternative, and clear errors when the base is missing, moved or changed.

Loading (full, adapter and sharded exports): the LLM is built on the meta device and given the
export's tensors, so a load allocates one copy of the weights (the files' tensors, counted by
`setokim.utils.memory.AllocatedBytes`) and no random LLM, gives the saved model's weights and
predictions, and a bad export fails naming what does not fit."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from setokim.model import export
from setokim.model.config import LLMConfig, LoRAConfig, SeTokIMConfig
from setokim.model.inference import GenerationConfig
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


# ---- loading with no random LLM -------------------------------------------------------------
# An LLM (about 14 MB in fp32) that outweighs the rest (tiny SeTok, projector, head: about
# 0.8 MB) as a 7B does, so that a random copy of it would stand out.
MEDIUM = LLMConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                   intermediate_size=768)  # fmt: skip
GEN = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[SeTokIM, Path]]:
    """{"full": (model, its full export), "adapter": (LoRA model, its adapter export)}."""
    root = tmp_path_factory.mktemp("medium")
    cfg = replace(SeTokIMConfig(), llm=MEDIUM)
    cfg.tokenizer.clustering.max_clusters = 8
    full = SeTokIM.from_config(cfg).eval()
    base = full.save_pretrained(root / "s2")
    lora = _lora_model(base)
    return {"full": (full, base), "adapter": (lora, lora.save_pretrained(root / "s3"))}


def _tensor_bytes(directory: Path) -> int:
    """Bytes of every tensor in the safetensors files under `directory` (what a load reads)."""
    from safetensors import safe_open

    total = 0
    for path in directory.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                tensor = handle.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    return total


def _predictions(model: SeTokIM) -> list[str]:
    g = torch.Generator().manual_seed(5)
    images = [[torch.rand(3, 64, 64, generator=g)] for _ in range(3)]
    return model.understand(images, ["what is it?", "colour?", "how many?"], GEN)


@pytest.mark.parametrize("kind", ["full", "adapter"])
def test_a_load_allocates_one_copy_and_gives_the_saved_model(medium, kind):
    from transformers import AutoModelForCausalLM

    from setokim.utils.memory import allocated_bytes

    saved, path = medium[kind]
    base = medium["full"][1]
    llm = sum(v.numel() * v.element_size() for k, v in saved.state_dict().items()
              if k.startswith("llm.") and "lora_" not in k)  # fmt: skip
    loaded, counter = allocated_bytes(lambda: SeTokIM.from_pretrained(path))
    # control: the counter sees a random LLM, what the loader before built and then overwrote
    _, random_llm = allocated_bytes(lambda: AutoModelForCausalLM.from_config(saved.llm.config))
    assert random_llm.total >= llm
    assert counter.total < 0.1 * llm, (counter.total, llm)  # projector, head, SeTok, adapters
    read = _tensor_bytes(base) + (_tensor_bytes(path) if kind == "adapter" else 0)
    assert counter.attached == pytest.approx(read, rel=0.01), (counter.attached, read)
    assert counter.all < 1.1 * read  # one copy: a random LLM would make it about two
    ours, want = loaded.state_dict(), saved.state_dict()
    assert set(ours) == set(want)
    assert all(torch.equal(ours[k], want[k]) for k in want)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in saved.named_parameters() if p.requires_grad
    ]
    torch.testing.assert_close(_logits(loaded), _logits(saved), rtol=0, atol=0)
    assert _predictions(loaded.eval()) == _predictions(saved)


def test_a_sharded_export_loads_one_copy(base_dir, tmp_path):
    from setokim.utils.memory import allocated_bytes

    sharded = _shard(base_dir, tmp_path / "s2_sharded")
    loaded, counter = allocated_bytes(lambda: SeTokIM.from_pretrained(sharded))
    assert counter.attached == pytest.approx(_tensor_bytes(sharded), rel=0.01)
    want = SeTokIM.from_pretrained(base_dir)
    torch.testing.assert_close(_logits(loaded), _logits(want), rtol=0, atol=0)
    assert all(not p.is_meta for p in loaded.parameters())


def _edited(full: Path, out: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """A copy of the export `full` whose weights file is `edit(state)`."""
    shutil.copytree(full, out, ignore=lambda d, n: [export.WEIGHTS_FILE] if Path(d) == full else [])
    state = load_file(str(full / export.WEIGHTS_FILE))
    save_file(edit(state), str(out / export.WEIGHTS_FILE))
    return out


def test_a_bad_export_fails_naming_what_does_not_fit(base_dir, tmp_path):
    key = "llm.model.layers.0.mlp.up_proj.weight"
    lacking = _edited(base_dir, tmp_path / "lacking", lambda s: {k: v for k, v in s.items()
                                                                  if k != key})  # fmt: skip
    with pytest.raises(RuntimeError, match=rf"does not fit the model: missing=\['{key}'\]"):
        SeTokIM.from_pretrained(lacking)
    extra = _edited(base_dir, tmp_path / "extra", lambda s: {**s, "llm.bogus": torch.zeros(2)})
    with pytest.raises(RuntimeError, match=r"unexpected=\['llm.bogus'\]"):
        SeTokIM.from_pretrained(extra)
    short = _edited(base_dir, tmp_path / "short", lambda s: {**s, key: s[key][:-1].clone()})
    with pytest.raises(ValueError, match=rf"{key} has shape"):
        SeTokIM.from_pretrained(short)


def test_bad_adapter_files_fail_naming_them(lora_model, tmp_path):
    out = lora_model.save_pretrained(tmp_path / "s3")
    heads = load_file(str(out / export.HEADS_FILE))
    save_file({k: v for k, v in heads.items() if not k.endswith("bias")},
              str(out / export.HEADS_FILE))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"heads.safetensors does not fit"):
        SeTokIM.from_pretrained(out)
    save_file(heads, str(out / export.HEADS_FILE))
    adapters = load_file(str(out / export.ADAPTER_FILE))
    save_file(dict(list(adapters.items())[1:]), str(out / export.ADAPTER_FILE))
    with pytest.raises(RuntimeError, match="adapter weights do not fit"):
        SeTokIM.from_pretrained(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only machine")
def test_a_cuda_device_without_cuda_is_refused(base_dir):
    with pytest.raises(ValueError, match="device 'cuda:0': CUDA is not available"):
        SeTokIM.from_pretrained(base_dir, device="cuda:0")
    with pytest.raises(ValueError, match="meta"):
        SeTokIM.from_pretrained(base_dir, device="meta")


def test_the_eval_stage_loads_its_checkpoint_onto_the_device(medium):
    from setokim.model.eval_adapter import from_export
    from setokim.stages.evaluate import EvalStageConfig, build_adapter
    from setokim.utils.memory import allocated_bytes

    saved, path = medium["adapter"]
    cfg = EvalStageConfig(checkpoint=str(path), shard_dir=None, data_root=str(path))
    adapter, counter = allocated_bytes(lambda: build_adapter(cfg, torch.device("cpu")))
    assert counter.total < 0.1 * _tensor_bytes(medium["full"][1])  # no random LLM
    assert adapter.model.device == torch.device("cpu")
    assert adapter.checkpoint == path
    assert _predictions(adapter.model) == _predictions(saved)
    suite = from_export(str(path), device="cpu")  # eval_suite/run.py --adapter-arg device=cpu
    assert suite.model.device == torch.device("cpu")
    assert _predictions(suite.model) == _predictions(saved)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_adapter_export_loads_straight_onto_cuda(medium):
    saved, path = medium["adapter"]
    loaded = SeTokIM.from_pretrained(path, device="cuda")
    state = loaded.state_dict()
    assert all(t.is_cuda for t in state.values())
    want = saved.state_dict()
    assert all(torch.equal(state[k].cpu(), want[k]) for k in want)
