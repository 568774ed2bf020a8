"""What a job will cost before it queues: memory per GPU, FLOPs, wall time, requeues.

The model of every training step is built on the meta device from configuration files only
(the LLM's and encoder's `config.json`, a Stage I/II export's config JSON, diffusers'
`unet/config.json`): no weights are read and nothing is allocated. Then one micro-batch of
the recipe's longest sample runs forward and backward on the meta device:

- activations are the bytes autograd saves for backward (a saved-tensors hook, storages
  counted once, parameters excluded), attributed to the FSDP unit that saved them; with
  activation checkpointing a unit keeps only its inputs, plus one unit's saved tensors
  while it is recomputed in backward;
- attention runs as a fused kernel (q, k, v, output and log-sum-exp saved, as FlashAttention
  and PyTorch's fused CPU kernel do), not as the T x T matrix of the math fallback;
- FLOPs are `torch.utils.flop_counter` counts of that forward and backward.

Parameters, gradients and AdamW states follow the trainer: trainable parameters are fp32
master weights (`setokim.train.parallel.apply_fsdp`), sharded over the world size with
FSDP; each FSDP unit is all-gathered in the compute dtype when it runs (two in flight), the
root's leftover parameters stay gathered for the whole step.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from setok_experiments.compose import ConfigError
from setok_experiments.schema import ClusterConfig, ExperimentConfig
from setokim.train.config import TrainerConfig

GIB = 2**30
# The fraction of GPU memory a plan may use: the CUDA context, the caching allocator's
# fragmentation and NCCL buffers take the rest.
MEMORY_HEADROOM = 0.9
DEFAULT_UTILISATION = 0.4  # model FLOPs utilisation assumed for the wall time


class PlanError(ConfigError):
    """The plan cannot be made, or it does not fit; the message names the term or key."""


# ---- fused attention on the meta device -------------------------------------------------------
class FusedAttention(TorchFunctionMode):
    """Route `F.scaled_dot_product_attention` to the fused (flash) kernel on meta/CPU tensors.

    On the meta device PyTorch would pick the math fallback, which materialises the T x T
    score matrix a GPU never stores; the fused CPU kernel's autograd saves what FlashAttention
    saves, and `flop_counter` counts it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            if q.device.type in ("meta", "cpu"):
                return _fused_sdpa(q, k, v, *args[3:], **kwargs)
        return func(*args, **kwargs)


def _fused_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    if k.shape[-3] != q.shape[-3]:  # grouped-query attention: repeat the kv heads
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # the kernel wants additive
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~attn_mask, float("-inf")
        )
    elif attn_mask is not None and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out[0]


# ---- what one step keeps ----------------------------------------------------------------------
@dataclass
class StepMeasure:
    """One micro-batch's forward + backward on the meta device."""

    saved_bytes: int  # everything autograd saved (no activation checkpointing)
    per_unit: list[int]  # saved bytes attributed to each FSDP unit
    unit_inputs: int  # bytes of the units' inputs (kept with activation checkpointing)
    forward_flops: int
    backward_flops: int

    @property
    def outside_units(self) -> int:
        return self.saved_bytes - sum(self.per_unit)

    @property
    def checkpointed_bytes(self) -> int:
        """Saved bytes with every unit checkpointed: inputs + the rest + one recompute."""
        return self.unit_inputs + self.outside_units + max(self.per_unit, default=0)

    @property
    def recompute_flops(self) -> int:
        return self.forward_flops  # upper bound: the units are nearly all of the forward


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def measure_step(
    model: nn.Module, units: list[nn.Module], loss_fn: Callable[[], Tensor]
) -> StepMeasure:
    """Run `loss_fn()` forward and backward, recording saved tensors per unit and FLOPs.

    Works on meta tensors (the plan) and on real ones (the tests compare the two).
    """
    from torch.utils.flop_counter import FlopCounterMode

    skip = {_storage_key(p) for p in model.parameters()}
    skip |= {_storage_key(b) for b in model.buffers()}
    seen: set[int] = set()
    per_unit = [0] * len(units)
    inputs_seen: set[int] = set()
    unit_inputs = 0
    stack: list[int] = []
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        key = _storage_key(t)
        if key in skip or key in seen:
            return t
        seen.add(key)
        size = t.untyped_storage().nbytes()
        total += size
        if stack:
            per_unit[stack[-1]] += size
        return t

    def pre(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            nonlocal unit_inputs
            stack.append(index)
            leaves = list(args) + list(kwargs.values())
            for leaf in leaves:
                if isinstance(leaf, Tensor) and leaf.is_floating_point():
                    key = _storage_key(leaf)
                    if key not in skip and key not in inputs_seen:
                        inputs_seen.add(key)
                        unit_inputs += leaf.untyped_storage().nbytes()

        return hook

    def post(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        stack.pop()

    handles = []
    for i, unit in enumerate(units):
        handles.append(unit.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(unit.register_forward_hook(post, with_kwargs=True))
    try:
        with FusedAttention(), FlopCounterMode(display=False) as fwd_count:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_fn()
        with FusedAttention(), FlopCounterMode(display=False) as bwd_count:
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return StepMeasure(
        saved_bytes=total,
        per_unit=per_unit,
        unit_inputs=unit_inputs,
        forward_flops=int(fwd_count.get_total_flops()),
        backward_flops=int(bwd_count.get_total_flops()),
    )


# ---- memory terms -----------------------------------------------------------------------------
@dataclass
class MemoryTerms:
    """Bytes per GPU. `activations` follows the trainer's activation checkpointing."""

    params: int
    grads: int
    optimizer: int
    gathered: int
    activations: int
    activations_no_ac: int
    activations_ac: int

    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("parameters (sharded)", self.params),
            ("gradients (fp32, sharded)", self.grads),
            ("AdamW states (fp32, sharded)", self.optimizer),
            ("gathered units (compute dtype)", self.gathered),
            ("activations", self.activations),
        ]


_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def memory_terms(
    model: nn.Module,
    units: list[nn.Module],
    trainable: list[nn.Parameter],
    step: StepMeasure,
    *,
    world_size: int,
    fsdp: bool,
    compute_dtype: torch.dtype | None,
    activation_checkpointing: bool,
) -> MemoryTerms:
    """Per-GPU bytes of a training step (see the module docstring for the rules)."""
    train_ids = {id(p) for p in trainable}
    shard = world_size if fsdp else 1
    master = 4 if compute_dtype is not None else None  # fp32 master weights
    params = 0
    for p in model.parameters():
        size = p.element_size() if (id(p) not in train_ids or master is None) else master
        params += p.numel() * size
    n_train = sum(p.numel() for p in trainable)
    grad_size = (
        4 if compute_dtype is not None else max((p.element_size() for p in trainable), default=4)
    )
    gathered = 0
    if fsdp:
        c = _BYTES.get(compute_dtype, 4) if compute_dtype is not None else 4
        in_units = {id(p) for u in units for p in u.parameters()}
        root = sum(p.numel() for p in model.parameters() if id(p) not in in_units)
        biggest = max((sum(p.numel() for p in u.parameters()) for u in units), default=0)
        biggest_train = max(
            (sum(p.numel() for p in u.parameters() if id(p) in train_ids) for u in units),
            default=0,
        )
        # root stays gathered; the running unit and the prefetched one; one unit's full grad
        gathered = root * c + 2 * biggest * c + biggest_train * 4
    acts = step.checkpointed_bytes if activation_checkpointing else step.saved_bytes
    return MemoryTerms(
        params=math.ceil(params / shard),
        grads=math.ceil(n_train * grad_size / shard),
        optimizer=math.ceil(n_train * 8 / shard),
        gathered=gathered,
        activations=acts,
        activations_no_ac=step.saved_bytes,
        activations_ac=step.checkpointed_bytes,
    )


# ---- the models, on the meta device, from configuration files ---------------------------------
@dataclass
class MetaStep:
    """One training step's model on the meta device and a micro-batch loss over it."""

    stage: str
    model: nn.Module
    units: list[nn.Module]
    trainable: list[nn.Parameter]
    loss_fn: Callable[[int], Callable[[], Tensor]]  # micro_batch -> () -> loss
    seq_len: int  # tokens per sample of the probe (LLM stages) or 0
    sample: str  # what one sample of the probe is, in words
    not_counted: list[str] = field(default_factory=list)


def _read_json(path: Path, key: str) -> dict[str, Any]:
    if not path.is_file():
        raise PlanError(f"{key}: {path} not found (the plan reads the architecture from it)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"{key}: {path} is not readable JSON: {err}") from None


def _setok_on_meta(tokenizer: Any, export: str | None, key: str) -> nn.Module:
    """SeTok from a save_pretrained/Stage I export dir's JSON, or from its config (+ the
    encoder's config.json when `encoder.pretrained_path` is set)."""
    from setok_tokenizer.config import SeTokConfig, from_dict
    from setok_tokenizer.setok import CONFIG_NAME, ENCODER_CONFIG_NAME, SeTok

    if export is not None:
        root = Path(export)
        folder = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        cfg = from_dict(SeTokConfig, _read_json(folder / CONFIG_NAME, key))
        hf = _read_json(folder / ENCODER_CONFIG_NAME, key)
    else:
        cfg = tokenizer
        hf = None
        if cfg.encoder.pretrained_path is not None:
            raw = _read_json(
                Path(cfg.encoder.pretrained_path) / "config.json",
                "tokenizer.encoder.pretrained_path",
            )
            hf = dict(raw.get("vision_config", raw))
            hf.pop("model_type", None)
            if cfg.encoder.family != "convnext":
                hf["image_size"] = cfg.encoder.image_size
            cfg = replace(cfg, encoder=replace(cfg.encoder, pretrained_path=None))
    with torch.device("meta"):
        return SeTok(cfg, encoder_hf_config=hf)


def _llm_on_meta(
    llm: Any, vocab: int | None, seed: int, raw: dict[str, Any] | None = None
) -> nn.Module:
    """The LLM from its transformers config `raw` (an export's `llm_config`), else from
    `pretrained_path/config.json`, else from the group's sizes."""
    from setokim.model.setokim import _build_llm

    if raw is None and llm.pretrained_path is not None:
        raw = _read_json(Path(llm.pretrained_path) / "config.json", "mllm.llm.pretrained_path")
    if raw is not None:
        heads = int(raw["num_attention_heads"])
        llm = replace(
            llm,
            pretrained_path=None,
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            intermediate_size=int(raw["intermediate_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        )
        vocab = int(raw["vocab_size"])
    with torch.device("meta"):
        return _build_llm(llm, vocab or 32000, seed)


def _setokim_step(name: str, stage: Any) -> MetaStep:
    """Stage II/III: the SeTokIM of the stage's config, LoRA applied for Stage III."""
    from setokim.model.lora import adapter_dtype, apply_lora
    from setokim.model.setokim import SeTokIM
    from setokim.model.text_tokenizer import build_text_tokenizer

    cfg = stage.model_cfg
    init_tok = getattr(stage.cfg, "init_tokenizer", None)
    init_from = getattr(stage.cfg, "init_from", None)
    where = f"stage.params ({name})"
    llm_config = None
    if init_from is not None:  # Stage III: the Stage II export names its SeTok and LLM
        from setokim.model.export import CONFIG_FILE

        exported = _read_json(Path(init_from) / CONFIG_FILE, f"{where}: init_from")
        init_tok = exported.get("tokenizer_path") or init_tok
        llm_config = exported.get("llm_config")
        if not isinstance(llm_config, dict):
            raise PlanError(f"{where}: init_from {init_from} has no llm_config in {CONFIG_FILE}")
    vision = _setok_on_meta(cfg.tokenizer, init_tok, f"{where}: init_tokenizer")
    text_tok = build_text_tokenizer()
    vocab = None if cfg.llm.pretrained_path is not None else len(text_tok) + 8
    llm = _llm_on_meta(cfg.llm, vocab, cfg.seed, llm_config)
    with torch.device("meta"):
        model = SeTokIM(replace(cfg, lora=replace(cfg.lora, enabled=False)), llm, vision, text_tok)
        if name == "stage3":
            apply_lora(model, cfg.lora)
            adapter_dtype(model)
    layers = list(model.llm.get_decoder().layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    enc = vision.encoder
    k = int(vision.cfg.clustering.max_clusters)
    text = int(stage.cfg.max_text_tokens or model.llm.config.max_position_embeddings)
    seq = text + k
    dtype = model.llm.get_input_embeddings().weight.dtype

    def loss_fn(batch: int) -> Callable[[], Tensor]:
        def run() -> Tensor:
            pixels = torch.zeros(batch, 3, enc.image_size, enc.image_size, device="meta")
            with torch.no_grad():
                enc.model(pixel_values=pixels)  # the frozen encoder (not clustering/merger)
            tokens = torch.zeros(batch, k, vision.output_dim, device="meta", dtype=dtype)
            ids = torch.zeros(batch, text, dtype=torch.long, device="meta")
            embeds = torch.cat([model.llm.get_input_embeddings()(ids), model.projector(tokens)], 1)
            # the 4-D boolean mask transformers builds from a padded batch's 2-D mask
            mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device="meta")
            hidden = model.llm.get_decoder()(
                inputs_embeds=embeds, attention_mask=mask, use_cache=False
            ).last_hidden_state
            logits = model.llm.get_output_embeddings()(hidden)
            ce = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                ids.new_zeros(batch * (seq - 1)),
            )
            reg = F.mse_loss(
                model.regression_head(hidden[:, text - 1 : seq - 1]).float(), tokens.float()
            )
            return ce + reg

        return run

    return MetaStep(
        stage=name,
        model=model,
        units=layers,
        trainable=trainable,
        loss_fn=loss_fn,
        seq_len=seq,
        sample=f"{text} text + {k} visual tokens, one {enc.image_size}px image",
        not_counted=["SeTok clustering and merger (no grad, transient)"],
    )


def _stage1_step(stage: Any) -> MetaStep:
    """Stage I: SeTok + diffusion decoder (U-Net, VAE, Q-Former) + mask decoder on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from setok_decoders import DiffusionDecoder, MaskDecoder
    from setokim.stages.stage1 import Stage1Model

    spec, mask = stage.cfg.decoder.diffusion, stage.cfg.decoder.mask
    setok = _setok_on_meta(stage.cfg.tokenizer, None, "stage1")
    width, feat = setok.output_dim, setok.encoder.feature_dim
    mapper = replace(spec.mapper, token_dim=width)
    if mapper.bert_path:
        bert = _read_json(
            Path(mapper.bert_path) / "config.json", "decoder.diffusion.mapper.bert_path"
        )
        mapper = replace(
            mapper,
            hidden_size=bert["hidden_size"],
            num_heads=bert["num_attention_heads"],
            intermediate_size=bert["intermediate_size"],
            bert_path=None,
        )
    unet_cfg, vae = None, None
    if spec.unet_path:
        unet_cfg = UNet2DConditionModel.load_config(_component(spec.unet_path, "unet"))
    if spec.vae_path:
        vae_cfg = AutoencoderKL.load_config(_component(spec.vae_path, "vae"))
    # Build the decoder in pixel space (3 channels), then put the real U-Net and VAE in.
    small = {**(dict(unet_cfg) if unet_cfg else dict(spec.unet or {}))}
    small = {k: v for k, v in small.items() if not k.startswith("_")}
    if unet_cfg is not None:
        small.update(in_channels=3, out_channels=3)
    diff_cfg = replace(spec, mapper=mapper, unet=small, unet_path=None, vae_path=None)
    mask_cfg = replace(mask, token_dim=width, feature_dim=feat)
    with torch.device("meta"):
        diffusion = DiffusionDecoder(diff_cfg)
        if unet_cfg is not None:
            diffusion.unet = UNet2DConditionModel.from_config(unet_cfg)
        if spec.vae_path:
            vae = AutoencoderKL.from_config(vae_cfg).requires_grad_(False)
            diffusion.vae = vae
        model = Stage1Model(setok, diffusion, MaskDecoder(mask_cfg))
    stage.apply_subphase(model)
    units = stage.fsdp_units(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    enc = setok.encoder
    size = int(diff_cfg.image_size)
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    channels = int(model.diffusion.unet.config.in_channels)
    k = int(setok.cfg.clustering.max_clusters)
    train_encoder = any(p.requires_grad for p in enc.parameters())

    def loss_fn(batch: int) -> Callable[[], Tensor]:
        def run() -> Tensor:
            pixels = torch.zeros(batch, 3, enc.image_size, enc.image_size, device="meta")
            ctx = contextlib.nullcontext() if train_encoder else torch.no_grad()
            with ctx:
                grid = enc.model(pixel_values=pixels).last_hidden_state
            tokens = torch.zeros(batch, k, width, device="meta") + grid.mean() * 0
            cond = _mapper_on_meta(model.diffusion.mapper, tokens)
            latents = torch.zeros(batch, channels, size // scale, size // scale, device="meta")
            t = torch.zeros(batch, dtype=torch.long, device="meta")
            eps = model.diffusion.unet(latents, t, encoder_hidden_states=cond).sample
            return F.mse_loss(eps.float(), latents.float())

        return run

    return MetaStep(
        stage="stage1",
        model=model,
        units=units,
        trainable=trainable,
        loss_fn=loss_fn,
        seq_len=0,
        sample=f"one {enc.image_size}px image (encoder), {size}px decoder target",
        not_counted=[
            "SeTok clustering and merger",
            "mask decoder activations" if stage.cfg.subphase == 2 else "",
            "VAE encoding (no grad, transient)" if vae is not None else "",
        ],
    )


def _mapper_on_meta(mapper: nn.Module, tokens: Tensor) -> Tensor:
    """The Q-Former mapper's forward on meta tokens, every token valid.

    `FeatureMapper.forward` checks the token mask's values and transformers reads a 2-D key
    mask's values to decide whether to drop it; meta tensors have no values. A 4-D boolean
    key mask (what transformers builds from a padded batch) is used as given, so the probe
    runs the masked cross-attention a padded training batch runs.
    """
    batch, k = tokens.shape[:2]
    queries = mapper.queries.expand(batch, -1, -1)
    keys = torch.ones(batch, 1, queries.shape[1], k, dtype=torch.bool, device=tokens.device)
    out = mapper.qformer(
        query_embeds=queries, encoder_hidden_states=tokens, encoder_attention_mask=keys
    ).last_hidden_state
    return mapper.proj(out)


def _component(path: str, sub: str) -> str:
    root = Path(path)
    return str(root / sub) if (root / sub).is_dir() else str(root)


def _plain(value: Any) -> Any:
    """Dataclasses inside mappings and lists as plain dicts (recursively)."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def training_steps(cfg: ExperimentConfig) -> Iterator[tuple[str, Any, TrainerConfig]]:
    """(stage name, built stage, trainer config) for every training step of the experiment."""
    from setokim.stages import build_stage
    from setokim.stages.pipeline import trainer_config

    # Plain data, as a job reads it from its YAML: the typed groups a recipe interpolates
    # into stage.params (${trainer}, ${decoder}, ${mllm}) arrive here as dataclasses.
    name, params = cfg.stage.name, _plain(dict(cfg.stage.params))
    if name == "pipeline":
        base = dict(params.get("trainer") or {})
        for step in params.get("steps") or []:
            trainer = trainer_config(dict(step.get("trainer") or {}), base)
            yield step["name"], build_stage(step["name"], dict(step.get("params") or {})), trainer
        return
    yield name, build_stage(name, params), cfg.trainer


def meta_step(name: str, stage: Any) -> MetaStep:
    """The step's model on the meta device (PlanError for stages the plan does not know)."""
    if name in ("stage2", "stage3"):
        return _setokim_step(name, stage)
    if name == "stage1":
        return _stage1_step(stage)
    raise PlanError(f"stage.name: no resource plan for stage {name!r} (stage1, stage2, stage3)")


# ---- the plan ---------------------------------------------------------------------------------
@dataclass
class StepPlan:
    """One training step of an experiment on its hardware."""

    stage: str
    nodes: int
    gpus_per_node: int
    world_size: int
    micro_batch: int
    grad_accum: int
    steps: int | None
    steps_note: str
    sample: str
    params_total: int
    params_trainable: int
    memory: MemoryTerms
    prefill_flops: float  # forward FLOPs per sample
    train_flops: float  # forward + backward (+ recompute) FLOPs per sample
    gpu_mem_gb: float | None
    gpu_tflops: float | None
    utilisation: float
    time_limit_min: int | None
    max_requeues: int | None
    not_counted: list[str]

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def wall_hours(self) -> float | None:
        if self.steps is None or self.gpu_tflops is None:
            return None
        per_gpu = self.train_flops * self.micro_batch * self.grad_accum
        return self.steps * per_gpu / (self.gpu_tflops * 1e12 * self.utilisation) / 3600

    @property
    def requeues(self) -> int | None:
        wall = self.wall_hours
        if wall is None or self.time_limit_min is None:
            return None
        return max(0, math.ceil(wall * 60 / self.time_limit_min) - 1)

    def problem(self) -> str | None:
        """Why this step cannot run as planned (the term that does not fit), or None."""
        if self.gpu_mem_gb is None:
            return None
        budget = self.gpu_mem_gb * GIB * MEMORY_HEADROOM
        total = self.memory.total()
        if total <= budget:
            return None
        name, size = max(self.memory.rows(), key=lambda r: r[1])
        hint = ""
        if name == "activations" and self.memory.activations > self.memory.activations_ac:
            hint = "; trainer.activation_checkpointing=true brings it to " + _gb(
                self.memory.activations_ac
            )
        elif name == "activations":
            hint = "; lower trainer.micro_batch_size (raise grad_accum to keep the batch)"
        elif self.world_size == 1 or self.gpus_per_node == 0:
            hint = "; more GPUs (cluster.nodes) shard it"
        return (
            f"{self.stage}: {_gb(total)} per GPU does not fit {self.gpu_mem_gb:g} GB x "
            f"{MEMORY_HEADROOM:g}; the largest term is {name} ({_gb(size)}){hint}"
        )


def _gb(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _steps(stage: Any, trainer: TrainerConfig, world: int) -> tuple[int | None, str]:
    from setokim.train.config import resolve_schedule

    if trainer.epochs is None:
        return trainer.max_steps, "trainer.max_steps"
    shard_dir = Path(stage.cfg.data.shard_dir)
    counter = getattr(stage, "epoch_batches", None)
    if not (shard_dir / "manifest.json").is_file() or not callable(counter):
        return None, f"{trainer.epochs:g} epoch(s) of {shard_dir} (no manifest: derived at start)"
    batches = counter(0, world, trainer.micro_batch_size)
    return resolve_schedule(trainer, batches, world).max_steps, (
        f"{trainer.epochs:g} epoch(s) = {batches} micro-batches per rank"
    )


def plan_step(
    name: str,
    stage: Any,
    trainer: TrainerConfig,
    cluster: ClusterConfig,
    *,
    on_cluster: bool,
    utilisation: float = DEFAULT_UTILISATION,
) -> StepPlan:
    """Build the step on the meta device, run one micro-batch, and size it on `cluster`."""
    built = meta_step(name, stage)
    nodes = cluster.nodes if on_cluster else 1
    gpn = cluster.gpus_per_node if on_cluster else 0
    world = nodes * cluster.tasks_per_node if on_cluster else 1
    use_gpu = on_cluster and gpn > 0
    compute = None
    if trainer.mixed_precision == "bf16" or (trainer.mixed_precision == "auto" and use_gpu):
        compute = torch.bfloat16
    fsdp = trainer.fsdp == "on" or (trainer.fsdp == "auto" and world > 1)
    mb = trainer.micro_batch_size
    step = measure_step(built.model, built.units, built.loss_fn(mb))
    memory = memory_terms(
        built.model,
        built.units,
        built.trainable,
        step,
        world_size=world,
        fsdp=fsdp,
        compute_dtype=compute,
        activation_checkpointing=trainer.activation_checkpointing,
    )
    train = step.forward_flops + step.backward_flops
    if trainer.activation_checkpointing:
        train += step.recompute_flops
    steps, note = _steps(stage, trainer, world)
    return StepPlan(
        stage=name,
        nodes=nodes,
        gpus_per_node=gpn,
        world_size=world,
        micro_batch=mb,
        grad_accum=trainer.grad_accum,
        steps=steps,
        steps_note=note,
        sample=built.sample,
        params_total=sum(p.numel() for p in built.model.parameters()),
        params_trainable=sum(p.numel() for p in built.trainable),
        memory=memory,
        prefill_flops=step.forward_flops / mb,
        train_flops=train / mb,
        gpu_mem_gb=cluster.gpu_mem_gb if use_gpu else None,
        gpu_tflops=cluster.gpu_tflops if use_gpu else None,
        utilisation=utilisation,
        time_limit_min=cluster.time_min if on_cluster else None,
        max_requeues=cluster.max_num_timeout if on_cluster else None,
        not_counted=[n for n in built.not_counted if n],
    )


PLANNED_STAGES = ("stage1", "stage2", "stage3")


def plan_resources(
    cfg: ExperimentConfig, *, utilisation: float = DEFAULT_UTILISATION
) -> list[StepPlan]:
    """Every training step's plan (the cluster's hardware when launcher.kind is slurm).

    Steps of the tiny objectives (toy, quickstart) have no plan: they are not sized (see
    `unplanned_steps`), rather than refused.
    """
    on_cluster = cfg.launcher.kind == "slurm"
    try:
        steps = list(training_steps(cfg))
    except (ValueError, TypeError, KeyError, FileNotFoundError) as err:
        raise PlanError(f"stage.params: {err}") from None
    return [
        plan_step(n, s, t, cfg.cluster, on_cluster=on_cluster, utilisation=utilisation)
        for n, s, t in steps
        if n in PLANNED_STAGES
    ]


def unplanned_steps(cfg: ExperimentConfig) -> list[str]:
    """Names of the experiment's training steps that the resource plan does not size."""
    name, params = cfg.stage.name, dict(cfg.stage.params)
    names = [s["name"] for s in params.get("steps") or []] if name == "pipeline" else [name]
    return [n for n in names if n not in PLANNED_STAGES and n != "eval"]


def format_plan(plan: StepPlan) -> str:
    """The plan as a two-column table (what `launch.py plan` and every launch print)."""
    from setok_experiments.table import format_table

    m = plan.memory
    gpus = f"{plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) = {plan.world_size} rank(s)"
    wall = plan.wall_hours
    rows: list[list[Any]] = [
        ["hardware", gpus],
        [
            "global batch",
            f"{plan.global_batch} = {plan.micro_batch} per GPU x {plan.grad_accum} accum "
            f"x {plan.world_size}",
        ],
        ["steps", f"{plan.steps if plan.steps is not None else '?'} ({plan.steps_note})"],
        ["sample", plan.sample],
        [
            "parameters",
            f"{plan.params_total / 1e9:.2f} B ({plan.params_trainable / 1e9:.3f} B train)",
        ],
    ]
    rows += [[f"memory: {name}", _gb(size)] for name, size in m.rows()]
    rows += [
        ["activations without / with AC", f"{_gb(m.activations_no_ac)} / {_gb(m.activations_ac)}"],
        [
            "memory per GPU",
            _gb(m.total())
            + (f" of {plan.gpu_mem_gb:g} GB" if plan.gpu_mem_gb is not None else " (no GPU check)"),
        ],
        ["prefill FLOPs per sample", f"{plan.prefill_flops / 1e12:.2f} TFLOP"],
        ["train FLOPs per sample", f"{plan.train_flops / 1e12:.2f} TFLOP"],
    ]
    if wall is not None:
        rows.append(
            ["wall time", f"{wall:.1f} h at {plan.utilisation:.0%} of {plan.gpu_tflops:g} TFLOP/s"]
        )
        if plan.requeues is not None:
            over = (
                f" (more than max_num_timeout={plan.max_requeues}: the job stops early)"
                if plan.max_requeues is not None and plan.requeues > plan.max_requeues
                else ""
            )
            rows.append(["requeues", f"{plan.requeues} at {plan.time_limit_min} min per job{over}"])
    else:
        rows.append(["wall time", "? (steps or cluster.gpu_tflops unknown)"])
    if plan.not_counted:
        rows.append(["not counted", "; ".join(plan.not_counted)])
    return f"plan of {plan.stage}:\n" + format_table(["term", "value"], rows)
