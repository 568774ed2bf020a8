#!/usr/bin/env python
"""SeTokIM on Shapes World: run (or reuse) the Stage I -> II -> III pipeline of
`+exp=setokim_shapes`, then evaluate the Stage III export with the eval suite.

Measured: VQA accuracy per question type beside the blind (question-only) baseline, the
shifted-image control (each document with another test scene's image; also for CIDEr-D),
both from `setok_eval.controls` on exactly the evaluated documents, and a simple baseline
model (`setokim.model.token_reader`: a small transformer trained on every training question
over the same frozen SeTok tokens, with its own shifted control), which says how much of
each answer the tokens hold for a model trained on the same questions; caption CIDEr-D, REC
Acc@0.5, ReasonSeg gIoU, editing L1, visual tokens per image of SeTok vs the `patch`
mechanism (same trained encoder and merger, clustering.mechanism=patch), and the
LLM's prefill FLOPs per VQA sample for both (setok_eval.metrics.flops; also for a
Vicuna-7B-sized LLM with the same token counts). Also the segmentation ceiling that Stage I
sets: gIoU when the mask decoder gets the true region embedding (the frozen SeTok token
that best overlaps the target mask, the Stage III regression target) instead of the LLM's
regressed one. Prints a table and a final JSON line.

    uv run python benchmarks/measure_setokim.py --run-dir runs/measure_setokim
    uv run python benchmarks/measure_setokim.py --run-dir runs/measure_setokim --eval-limit 16
    uv run python benchmarks/measure_setokim.py --stage1-export STAGE1_EXPORT ...
    # the paper's comparison, small: the same Stages II -> III on the same Stage I export
    # with every patch a token, then SeTok's run reads the patch run's figures
    uv run python benchmarks/measure_setokim.py --run-dir runs/patch --stage1-export STAGE1_EXPORT \
        --clustering-mechanism patch ...
    uv run python benchmarks/measure_setokim.py --run-dir runs/setok --stage1-export STAGE1_EXPORT \
        --patch-run runs/patch ...

`--eval-split train` evaluates on the first --test-images training images instead (outputs
suffixed `_train`, e.g. measure_train.json): a model that scores there as on the test split
is not memorising its training scenes but falling short of them.

`--segment-from nearest_token --ground-from mask` evaluate an export's segment and ground
another way than its config says (`SeTokIMConfig.segment_from`, `.ground_from`).

A finished pipeline in --run-dir is reused (each stage is skipped once done);
`--stage1-export` reuses a finished Stage I (`+exp=stage1_shapes` exported with
tools/export_run.py) and trains only Stages II and III on it. Also printed: the token
probes of `benchmarks/probe_tokens.py` on the model's SeTok, Stage I's reconstruction L1
beside a flat-grey and a mean-colour image, editing L1 beside the same references and
beside returning the input unchanged, POPE F1, and text-to-image's named-colour match (the
generated image's dominant Shapes World colour is one its prompt names; the same images
against the other prompts are the control). The last line is one JSON object whose
keys include those of the issue (`token_owned` ... `train_wall_s`); a figure this script
does not measure is null with the reason under `not_measured`; the same object is written
to <run dir>/measure.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from setokim.data.shapes_world import World
from setokim.model.config import GROUND_FROM, SEGMENT_FROM
from setokim.model.inference import GenerationConfig

ROOT = Path(__file__).resolve().parent.parent
TASKS = [
    "shapes_vqa", "shapes_caption", "shapes_rec", "shapes_reasonseg", "shapes_pope", "shapes_edit",
    "shapes_t2i",
]  # fmt: skip
GENERATION_TASKS = ("shapes_edit", "shapes_t2i")  # run at --edit-steps diffusion steps
MEASURE_FILE = "measure.json"


def compose(run_dir: Path, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """The experiment config (validated) and its resolved pipeline spec."""
    from omegaconf import OmegaConf

    from setok_experiments.compose import compose_experiment, validate
    from setokim.stages import available_stages, register_stage

    if "stage1" not in available_stages():  # until the registry lists it
        register_stage("stage1", "setokim.stages.stage1:build")
    cfg = compose_experiment("setokim_shapes", [f"run_root={run_dir}", *overrides])
    obj = validate(cfg)
    params = OmegaConf.to_container(cfg.stage.params, resolve=True)
    return obj, params  # type: ignore[return-value]


def cpu_generation(task: Any, steps: int) -> Any:
    """An image task at `steps` diffusion steps and without FID (it needs an Inception file)."""
    metrics = tuple(m for m in task.metrics if m.metric != "fid")
    primary = task.primary if any(m.name == task.primary for m in metrics) else metrics[0].name
    generation = {**task.generation, "num_inference_steps": steps}
    return replace(task, generation=generation, metrics=metrics, primary=primary)


def blind_from_card(shard_dir: Path, docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Question-only baselines: the card's figure for the test split, and the card's train
    majority answer per question type scored on exactly the evaluated documents
    (`blind_scores`: per-document scores by id, for the per-type table)."""
    from setok_eval.controls import blind_scores, majority_answers

    card = json.loads((shard_dir / "dataset_card.json").read_text(encoding="utf-8"))
    per = card["blind_baseline"]["test"]
    n = sum(v["n"] for v in per.values())
    full = sum(v["by_type"] * v["n"] for v in per.values()) / n
    full_q = sum(v["by_question"] * v["n"] for v in per.values()) / n
    scores = blind_scores(docs, majority_answers(card["splits"]["train"]["vqa_answers"]))
    return {
        "blind_by_type_test": full,
        "blind_by_question_test": full_q,
        "blind_by_type_evaluated": sum(scores.values()) / len(scores),
        "blind_scores": scores,
    }


def evaluated(results: dict[str, Any], task: Any, data_root: Path, metric: str) -> tuple:
    """The documents a task was scored on (by the result's item ids) and their scores by id."""
    from setok_eval.documents import load_documents
    from setok_eval.results import item_states

    ids, states, _ = item_states(results["tasks"][task.name], metric)
    by_id = {d["id"]: d for d in load_documents(task, data_root)[0]}
    return [by_id[i] for i in ids], dict(zip(ids, states[:, 0].tolist(), strict=True))


def token_budget(model: Any, docs: list[dict[str, Any]], data_root: Path) -> dict[str, Any]:
    """Visual tokens per image (SeTok vs patch) and LLM prefill FLOPs per VQA sample."""
    import numpy as np
    import torch
    from PIL import Image

    from setok_eval.metrics.flops import prefill_flops_per_sample
    from setok_tokenizer import SeTok
    from setokim.model.inference import Generator
    from setokim.stages.study import VICUNA_7B

    setok = model.vision_tokenizer
    patch = SeTok.from_config(
        replace(setok.cfg, clustering=replace(setok.cfg.clustering, mechanism="patch"))
    )
    patch.load_state_dict(setok.state_dict())
    patch.eval()
    eval_dir = data_root / "data" / "eval"
    keys = sorted({d["image"] for d in docs})
    size = setok.cfg.encoder.image_size
    images = [
        torch.from_numpy(
            np.array(Image.open(eval_dir / k).convert("RGB").resize((size, size)))
        ).permute(2, 0, 1).float() / 255.0
        for k in keys
    ]  # fmt: skip
    pixels = torch.stack(images)
    with torch.no_grad():
        n_setok = setok(setok.preprocess(pixels)).num_tokens.float()
        n_patch = patch(patch.preprocess(pixels)).num_tokens.float()
    per_image = dict(zip(keys, n_setok.tolist(), strict=True))
    gen = Generator(model)
    prompt = "{question}\nAnswer the question using a single word or phrase."
    samples = [
        gen.prompt_sample([images[keys.index(d["image"])]], prompt.format(**d)) for d in docs
    ]
    layout = model.collate(samples)
    text = [int(t) for t in layout.text_len]
    vis = [int(per_image[d["image"]]) for d in docs]
    n_p = int(n_patch[0])
    llm = model.llm.config.to_dict()
    f_setok = prefill_flops_per_sample(llm, text, vis, causal=True)
    f_patch = prefill_flops_per_sample(llm, text, n_p, causal=True)
    v_setok = prefill_flops_per_sample(VICUNA_7B, text, vis, causal=True)
    v_patch = prefill_flops_per_sample(VICUNA_7B, text, n_p, causal=True)
    mean = lambda xs: float(sum(xs) / len(xs))  # noqa: E731
    return {
        "images": len(keys),
        "tokens_setok_mean": float(n_setok.mean()),
        "tokens_setok_min": int(n_setok.min()),
        "tokens_setok_max": int(n_setok.max()),
        "tokens_patch": n_p,
        "text_tokens_mean": mean(text),
        "flops_setok": mean(f_setok),
        "flops_patch": mean(f_patch),
        "flops_ratio": mean(f_setok) / mean(f_patch),
        "vicuna7b_flops_setok": mean(v_setok),
        "vicuna7b_flops_patch": mean(v_patch),
        "vicuna7b_flops_ratio": mean(v_setok) / mean(v_patch),
    }


def oracle_segmentation(model: Any, data_root: Path, limit: int) -> dict[str, float]:
    """Where segmentation is lost. `oracle_query`: gIoU of the mask decoder queried with each
    ReasonSeg target's true region embedding (what Stage III regresses); `best_of_k`: mean
    IoU of the best of the masks the decoder draws for all the image's SeTok tokens together
    (as Stage I trains it) — the ceiling any query could reach with this Stage I."""
    import numpy as np
    import torch
    from PIL import Image

    from setok_eval.metrics.segmentation import giou_ciou
    from setokim.model.inference import segment_masks
    from setokim.model.losses import region_embeddings

    eval_dir = data_root / "data" / "eval"
    docs = [
        json.loads(line) for line in (eval_dir / "shapes_reasonseg.jsonl").read_text().splitlines()
    ][:limit]
    size = model.vision_tokenizer.cfg.encoder.image_size

    def load(rel: str, mode: str) -> np.ndarray:
        return np.array(Image.open(eval_dir / rel).convert(mode).resize((size, size)))

    pixels = torch.stack(
        [torch.from_numpy(load(d["image"], "RGB")).permute(2, 0, 1).float() / 255 for d in docs]
    ).to(model.device)
    gt = [load(d["mask"], "L") > 127 for d in docs]
    with torch.no_grad():
        enc = model.encode_images(pixels)
        target = torch.from_numpy(np.stack(gt)).to(model.device)
        queries = region_embeddings(enc.tokens, enc.token_mask, enc.raw.masks, target)
        pred = segment_masks(model, pixels, queries[:, None])
        every = model.mask_decoder(
            enc.tokens, enc.token_mask, enc.raw.features, output_size=(size, size)
        )  # (B, K, H, W) logits; padded slots hold a large negative logit
    inter = ((every > 0) & target[:, None]).sum((-2, -1)).float()
    union = ((every > 0) | target[:, None]).sum((-2, -1)).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    iou = iou.masked_fill(~enc.token_mask.bool(), 0.0)
    return {
        "reasonseg_giou_oracle_query": giou_ciou([p.cpu().numpy() for p in pred], gt)[0],
        "reasonseg_iou_best_of_k": float(iou.max(1).values.mean()),
    }


def image_references(data_root: Path, docs: list[dict[str, Any]]) -> dict[str, float]:
    """Editing L1 of trivial answers on the evaluated edit documents: a flat grey image, the
    mean colour of the targets, and the input image returned unchanged."""
    import numpy as np
    from PIL import Image

    eval_dir = data_root / "data" / "eval"

    def load(rel: str) -> np.ndarray:
        return np.asarray(Image.open(eval_dir / rel).convert("RGB"), dtype=np.float32) / 255.0

    targets = np.stack([load(d["target"]) for d in docs])
    inputs = np.stack([load(d["image"]) for d in docs])
    mean = targets.mean((0, 1, 2), keepdims=True)
    return {
        "edit_l1_flat": float(np.abs(targets - 0.5).mean()),
        "edit_l1_mean_colour": float(np.abs(targets - mean).mean()),
        "edit_l1_input": float(np.abs(targets - inputs).mean()),
    }


def reader_scores(
    setok: Any,
    shard_dir: Path,
    image_size: int,
    task: Any,
    mapping: dict[str, str],
    run_dir: Path,
    data_root: Path,
    args: argparse.Namespace,
    tag: str = "",
    geometry: bool = False,
) -> list[tuple[str, list[float]]]:
    """VQA scores of the simple baseline model (a token reader trained on every training
    question over the same frozen SeTok) on the evaluated documents, own and shifted images.
    geometry: the reader's tokens also say where their clusters lie, as the model's do."""
    from setok_eval.controls import ShiftedImageAdapter
    from setok_eval.runner import run_eval
    from setokim.model.token_reader import (
        TokenReaderAdapter,
        TokenReaderConfig,
        collect_vqa_examples,
        fit_token_reader,
    )  # fmt: skip

    cfg = TokenReaderConfig(steps=args.reader_steps, seed=args.seed, geometry=geometry)
    examples = collect_vqa_examples(setok, shard_dir, "train", cfg.max_tokens, geometry=geometry)
    reader = fit_token_reader(examples, cfg)
    adapter = TokenReaderAdapter(reader, setok, image_size, batch_size=32)
    out = []
    for name, model in (
        ("reader", adapter),
        ("reader_shifted", ShiftedImageAdapter(adapter, mapping)),
    ):
        results = run_eval(
            model, [task], run_dir / f"eval_{name}{tag}", data_root=data_root, batch_size=32,
            limit=args.eval_limit, n_resamples=200,
        )  # fmt: skip
        assert results is not None
        out.append((name, evaluated(results, task, data_root, "vqa_accuracy")[1]))
    return out


def stage1_figures(
    export: Path, shard_dir: Path, probe_dir: Path, world: World
) -> dict[str, float]:
    """Token probes (object owns its token, colour, shape) on scenes of `world` and
    reconstruction L1 of a Stage I export, with the flat-grey and mean-colour references on
    the same held-out images."""
    from measure_stage1 import held_out, recon_l1
    from probe_tokens import probe_row, scenes

    from setokim.stages.stage1 import load_parts, resize_images

    model = load_parts(export)
    probes = probe_row(
        model.setok,
        scenes(probe_dir, "probe_train", 512, 101, world=world),
        scenes(probe_dir, "probe_test", 256, 202, world=world),
    )
    pixels = held_out(shard_dir)[0][:64]
    small = resize_images(pixels, model.diffusion.config.image_size)
    return {
        "token_owned": probes["owned"],
        "token_colour": probes["token_colour"],
        "token_shape": probes["token_shape"],
        "encoder_colour": probes["encoder_colour"],
        "encoder_shape": probes["encoder_shape"],
        "probe_objects": probes["objects_test"],
        "recon_l1": recon_l1(model, pixels, 25, 0),
        "recon_l1_flat": float((small - 0.5).abs().mean()),
        "recon_l1_mean_colour": float((small - small.mean((0, 2, 3), keepdim=True)).abs().mean()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/measure_setokim"))
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--test-images", type=int, default=32, help="test split size")
    parser.add_argument("--eval-limit", type=int, default=24, help="documents per task")
    parser.add_argument("--edit-steps", type=int, default=10, help="diffusion steps for edit")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="shifted-image pairing, bootstrap")
    parser.add_argument("--stage1-export", type=Path, help="reuse this Stage I export")
    parser.add_argument(
        "--clustering-mechanism",
        help="with --stage1-export: train Stages II-III on a copy of the export whose SeTok "
        "clusters this way (e.g. patch: every patch a token), the same weights",
    )
    parser.add_argument(
        "--patch-run", type=Path,
        help="a finished --clustering-mechanism patch run dir: its VQA and tokens per image "
        "are this run's patch_vqa and patch_tokens_per_image",
    )  # fmt: skip
    parser.add_argument(
        "--reader-steps", type=int, default=3000,
        help="steps of the token reader (the simple baseline model); 0 skips it",
    )  # fmt: skip
    for mode, field, choices in (("segment", "segment_from", SEGMENT_FROM),
                                 ("ground", "ground_from", GROUND_FROM)):  # fmt: skip
        parser.add_argument(
            "--" + field.replace("_", "-"), choices=choices,
            help=f"evaluate {mode} this way instead of as the export's config says "
            f"(SeTokIMConfig.{field})",
        )  # fmt: skip
    parser.add_argument(
        "--eval-split", choices=("test", "train"), default="test",
        help="the split whose documents are evaluated (train: its first --test-images images)",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of +exp=setokim_shapes")
    args = parser.parse_args()
    if args.patch_run is not None and args.eval_split != "test":
        parser.error(
            "--patch-run reads the patch run's test-split figures: use it with --eval-split test"
        )
    if args.clustering_mechanism and args.stage1_export is None:
        parser.error("--clustering-mechanism needs --stage1-export (the export it re-clusters)")
    patch_figures = None
    if args.patch_run is not None:
        path = args.patch_run / MEASURE_FILE
        if not path.is_file():
            parser.error(f"--patch-run {args.patch_run}: no {MEASURE_FILE} (not a finished run)")
        patch_figures = json.loads(path.read_text(encoding="utf-8"))
        if patch_figures.get("clustering_mechanism") != "patch":
            parser.error(f"--patch-run {args.patch_run}: not a --clustering-mechanism patch run")
    from setok_eval.controls import ShiftedImageAdapter, grouped_scores, shifted_image_map
    from setok_eval.runner import run_eval
    from setokim.data import generate_dataset
    from setokim.data.eval_export import export_eval_data, shapes_tasks
    from setokim.model.eval_adapter import SeTokIMAdapter
    from setokim.stages.common import copy_with_clustering
    from setokim.stages.pipeline import run_pipeline

    run_dir = args.run_dir.resolve()
    exp, spec = compose(run_dir, args.overrides)
    shard_dir = Path(exp.data.shard_dir)
    if not (shard_dir / "manifest.json").is_file():
        generate_dataset(
            shard_dir, train=args.train_images, val=8, test=args.test_images,
            image_size=exp.data.image_size or 64, seed=0, world=exp.data.world, progress=True,
        )  # fmt: skip

    t0 = time.perf_counter()
    steps = [(s["name"], s.get("params") or {}, s.get("trainer") or {}) for s in spec["steps"]]
    if args.stage1_export is not None:
        if not (args.stage1_export / "tokenizer").is_dir():
            parser.error(
                f"--stage1-export {args.stage1_export}: not a Stage I export (no tokenizer/)"
            )
        init = args.stage1_export.resolve()
        if args.clustering_mechanism:
            init = copy_with_clustering(
                init, run_dir / f"stage1_export_{args.clustering_mechanism}",
                {"mechanism": args.clustering_mechanism},
                (("tokenizer/setok_config.json", ()),),
            )  # fmt: skip
        steps = [s for s in steps if s[0] != "stage1"]
        steps[0] = (steps[0][0], {**steps[0][1], "init_tokenizer": str(init)}, steps[0][2])
    pipe = run_pipeline(steps, run_dir / "pipeline", trainer_defaults=spec["trainer"])
    train_s = time.perf_counter() - t0
    if pipe.preempted:
        print("pipeline preempted; rerun to continue")
        return 3
    export = pipe.export("stage3")
    assert export is not None, "stage3 left no export"

    t1 = time.perf_counter()
    tag = "" if args.eval_split == "test" else f"_{args.eval_split}"  # output names
    data_root = run_dir / f"eval_data{tag}"
    export_eval_data(
        shard_dir, args.eval_split, data_root,
        limit=None if args.eval_split == "test" else args.test_images,
    )  # fmt: skip
    tasks = shapes_tasks(ROOT / "eval_suite" / "tasks", data_root, TASKS)
    tasks = [cpu_generation(t, args.edit_steps) if t.name in GENERATION_TASKS else t for t in tasks]
    decoding = GenerationConfig(segment_from=args.segment_from, ground_from=args.ground_from)
    adapter = SeTokIMAdapter.from_pretrained(
        export, batch_size=args.batch_size, generation=decoding
    )
    results = run_eval(
        adapter, tasks, run_dir / f"eval{tag}", data_root=data_root, batch_size=args.batch_size,
        limit=args.eval_limit, n_resamples=200, progress=True,
    )  # fmt: skip
    eval_s = time.perf_counter() - t1
    assert results is not None
    by_name = {t.name: t for t in tasks}
    docs, model_scores = evaluated(results, by_name["shapes_vqa"], data_root, "vqa_accuracy")
    caption_docs, _ = evaluated(results, by_name["shapes_caption"], data_root, "cider_d")
    blind = blind_from_card(shard_dir, docs)
    blind_per_doc = blind.pop("blind_scores")
    mapping = shifted_image_map([d["image"] for d in docs + caption_docs], seed=args.seed)
    shifted = run_eval(
        ShiftedImageAdapter(adapter, mapping), [by_name["shapes_vqa"], by_name["shapes_caption"]],
        run_dir / f"eval_shifted{tag}", data_root=data_root, batch_size=args.batch_size,
        limit=args.eval_limit, n_resamples=200, progress=True,
    )  # fmt: skip
    assert shifted is not None
    _, shifted_scores = evaluated(shifted, by_name["shapes_vqa"], data_root, "vqa_accuracy")
    columns = [("model", model_scores), ("blind", blind_per_doc), ("shifted", shifted_scores)]
    if args.reader_steps > 0:
        columns += reader_scores(
            adapter.model.vision_tokenizer, shard_dir, exp.data.image_size or 64,
            by_name["shapes_vqa"], mapping, run_dir, data_root, args, tag,
            geometry=adapter.model.config.visual_geometry,
        )  # fmt: skip
    per_type = {
        name: grouped_scores(scores, docs, n_resamples=200, seed=args.seed)
        for name, scores in columns
    }
    budget = token_budget(adapter.model, docs, data_root)
    edit_docs, _ = evaluated(results, by_name["shapes_edit"], data_root, "l1")
    references = image_references(data_root, edit_docs)
    stage1_export = args.stage1_export or pipe.export("stage1")
    assert stage1_export is not None, "no Stage I export"
    stage1 = stage1_figures(
        Path(stage1_export), shard_dir, run_dir / "probe_scenes", exp.data.world
    )

    def score(task: str, metric: str) -> float:
        return float(results["tasks"][task]["metrics"][metric]["value"])

    figures = {
        "vqa_accuracy": score("shapes_vqa", "vqa_accuracy"),
        **blind,
        "vqa_shifted": per_type["shifted"]["all"]["value"],
        "caption_cider_d": score("shapes_caption", "cider_d"),
        "cider_shifted": float(shifted["tasks"]["shapes_caption"]["metrics"]["cider_d"]["value"]),
        "rec_acc_at_0.5": score("shapes_rec", "rec_accuracy"),
        "reasonseg_giou": score("shapes_reasonseg", "giou"),
        **oracle_segmentation(adapter.model, data_root, args.eval_limit),
        "edit_l1": score("shapes_edit", "l1"),
        **references,
        "pope_f1": score("shapes_pope", "pope_f1"),
        "pope_yes_ratio": score("shapes_pope", "pope_yes_ratio"),
        "t2i_colour": score("shapes_t2i", "colour_match"),
        "t2i_colour_other_prompts": float(
            results["tasks"]["shapes_t2i"]["metrics"]["colour_match"]["details"]["other_prompts"]
        ),
        **stage1,
        **budget,
    }
    losses = {
        r.name: {"step": r.step, "last_loss": r.last_loss, "skipped": r.skipped} for r in pipe.steps
    }
    print("\nSeTokIM on Shapes World (tiny CPU pipeline; eval on the first "
          f"{args.eval_limit} documents per task of a {args.test_images}-image test split)")  # fmt: skip
    print(f"{'figure':32s} value")
    for key, value in figures.items():
        print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")
    names = [name for name, _ in columns]
    print(f"\n{'VQA by question type':24s} {'n':>4s}  {' / '.join(names)} (95% CI)")
    for qtype, cell in per_type["model"].items():
        row = [per_type[k][qtype] for k in names]
        text = " / ".join(f"{c['value']:.3f} [{c['ci95'][0]:.2f},{c['ci95'][1]:.2f}]" for c in row)
        print(f"{qtype:24s} {cell['n']:4d}  {text}")
    print(
        f"{'visual tokens setok/patch':32s} {budget['tokens_setok_mean'] / budget['tokens_patch']:.3f}"
    )
    print(f"{'train seconds':32s} {train_s:.1f}   eval seconds {eval_s:.1f}")
    stage_s = {r.name: getattr(r, "seconds", None) for r in pipe.steps}
    issue_keys = {
        **{
            k: stage1[k]
            for k in ("token_owned", "token_colour", "token_shape", "recon_l1", "recon_l1_flat")
        },
        "vqa": figures["vqa_accuracy"],
        "vqa_blind": blind["blind_by_type_evaluated"],
        "vqa_shifted": figures["vqa_shifted"],
        "reader_vqa": per_type["reader"]["all"]["value"] if "reader" in per_type else None,
        "reader_vqa_shifted": (
            per_type["reader_shifted"]["all"]["value"] if "reader" in per_type else None
        ),
        "rec_acc": figures["rec_acc_at_0.5"],
        "reasonseg_giou": figures["reasonseg_giou"],
        "pope_f1": figures["pope_f1"],
        "cider": figures["caption_cider_d"],
        "cider_shifted": figures["cider_shifted"],
        "edit_l1": figures["edit_l1"],
        "edit_l1_flat": references["edit_l1_flat"],
        "t2i_colour": figures["t2i_colour"],
        "t2i_colour_other_prompts": figures["t2i_colour_other_prompts"],
        "patch_vqa": patch_figures["vqa"] if patch_figures else None,
        "patch_vqa_shifted": patch_figures["vqa_shifted"] if patch_figures else None,
        "tokens_per_image": budget["tokens_setok_mean"],
        "patch_tokens_per_image": (
            patch_figures["tokens_per_image"] if patch_figures else budget["tokens_patch"]
        ),
        "stage1_wall_s": stage_s.get("stage1"),
        "train_wall_s": sum(stage_s.get(n) or 0.0 for n in ("stage2", "stage3")),
    }
    not_measured = {}
    if patch_figures is None:
        not_measured["patch_vqa"] = "no --patch-run given (the patch-mechanism Stages II-III)"
    if args.reader_steps <= 0:
        not_measured["reader_vqa"] = "--reader-steps 0"
    if stage_s.get("stage1") is None:
        not_measured["stage1_wall_s"] = "Stage I reused from --stage1-export (its own run's time)"
    record = {
        "benchmark": "measure_setokim", **issue_keys, "not_measured": not_measured, "run_dir": str(run_dir), "stages": losses,
        "clustering_mechanism": args.clustering_mechanism or "as the Stage I export",
        "segment_from": args.segment_from or adapter.model.config.segment_from,
        "ground_from": args.ground_from or adapter.model.config.ground_from,
        "patch_run": str(args.patch_run) if args.patch_run else None,
        "eval_limit": args.eval_limit, "test_images": args.test_images,
        "eval_split": args.eval_split,
        "edit_steps": args.edit_steps, "train_s": train_s, "eval_s": eval_s, **figures,
        "vqa_by_type": {k: {n: c["value"] for n, c in v.items()} for k, v in per_type.items()},
    }  # fmt: skip
    out = run_dir / MEASURE_FILE.replace(".json", f"{tag}.json")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    tmp.replace(out)  # whole or absent: --patch-run reads it
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
