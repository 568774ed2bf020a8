"""The dataset card: counts, per-task statistics and the blind (question-only) baselines."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from setokim.data.schema import SampleAnnotation, VQAItem
from setokim.utils.io import atomic_write_json, atomic_write_text


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy: min(#humans who gave `prediction` / 3, 1)."""
    return min(sum(a == prediction for a in answers) / 3.0, 1.0)


def blind_baseline(
    train: Sequence[VQAItem], evaluate: Sequence[VQAItem]
) -> dict[str, dict[str, float]]:
    """Question-only baselines per question type, fitted on `train`, scored on `evaluate`.

    by_type: always answer the majority answer of the type; by_question: the majority answer
    of the exact question text (falls back to by_type); chance: 1 / distinct answers of the type;
    chance_vqa: the VQA accuracy of a uniformly random guess among those answers (a little
    above `chance`, since a guess that matches one of the ten human answers earns 1/3).
    """
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    by_text: dict[str, Counter[str]] = defaultdict(Counter)
    for q in train:
        by_type[q.qtype][q.answer] += 1
        by_text[q.question][q.answer] += 1
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for q in evaluate:
        space = sorted(by_type[q.qtype]) or [q.answer]
        scores[q.qtype]["chance_vqa"].append(
            sum(vqa_accuracy(a, q.answers) for a in space) / len(space)
        )
        type_guess = by_type[q.qtype].most_common(1)[0][0] if by_type[q.qtype] else ""
        text_guess = by_text[q.question].most_common(1)[0][0] if by_text[q.question] else type_guess
        scores[q.qtype]["by_type"].append(vqa_accuracy(type_guess, q.answers))
        scores[q.qtype]["by_question"].append(vqa_accuracy(text_guess, q.answers))
    out = {}
    for qtype, s in sorted(scores.items()):
        n_answers = len(by_type[qtype]) or 1
        out[qtype] = {
            "n": len(s["by_type"]),
            "by_type": sum(s["by_type"]) / len(s["by_type"]),
            "by_question": sum(s["by_question"]) / len(s["by_question"]),
            "chance": 1.0 / n_answers,
            "chance_vqa": sum(s["chance_vqa"]) / len(s["chance_vqa"]),
        }
    return out


def build_card(
    samples: dict[str, Iterable[SampleAnnotation]], info: dict[str, Any]
) -> dict[str, Any]:
    """Statistics of every split; the blind baseline is fitted on train (else on the split)."""
    card: dict[str, Any] = {"info": info, "splits": {}}
    vqa_items: dict[str, list[VQAItem]] = {}
    for split, items in samples.items():
        st: dict[str, Any] = {
            "images": 0,
            "objects_per_image": Counter(),
            "items": Counter(),
            "vqa_answers": defaultdict(Counter),
            "pope": Counter(),
            "edit_ops": Counter(),
            "shapes": Counter(),
            "colors": Counter(),
        }
        vqa_items[split] = []
        for s in items:
            st["images"] += 1
            st["objects_per_image"][len(s.objects)] += 1
            for task in ("caption", "vqa", "pope", "rec", "reasonseg", "edit", "t2i", "chat"):
                st["items"][task] += s.num_items(task)
            for q in s.vqa:
                st["vqa_answers"][q.qtype][q.answer] += 1
            vqa_items[split].extend(s.vqa)
            for p in s.pope:
                st["pope"][f"{p.split}/{p.answer}"] += 1
            for e in s.edit:
                st["edit_ops"][e.op] += 1
            for o in s.objects:
                st["shapes"][o.category] += 1
                st["colors"][o.color] += 1
        card["splits"][split] = {
            k: (
                {kk: dict(sorted(vv.items())) for kk, vv in sorted(v.items())}
                if k == "vqa_answers"
                else dict(sorted(v.items()))
                if isinstance(v, Counter)
                else v
            )
            for k, v in st.items()
        }
    fit = vqa_items.get("train") or []
    held_out = {
        s: v for s, v in vqa_items.items() if v and (s != "train" or not fit or len(vqa_items) == 1)
    }
    if fit and not any(s != "train" for s in held_out):
        held_out = {"train": fit}  # only a train split: in-sample, flagged in the card
    card["blind_baseline"] = {
        split: blind_baseline(fit or items, items) for split, items in held_out.items()
    }
    card["blind_baseline_fit"] = "train" if fit else "same split (in-sample)"
    return card


def card_markdown(card: dict[str, Any]) -> str:
    """A human-readable README for the dataset directory."""
    info = card["info"]
    shapes = info.get("source", "shapes_world") == "shapes_world"
    lines = [
        f"# {info.get('title', 'Shapes World')}",
        "",
        (
            f"generator `{info.get('generator')}`, seed {info.get('seed')}, image size "
            f"{info.get('image_size')}, data version `{info.get('version')}`."
            if shapes
            else f"converted from `{info.get('source')}`, data version `{info.get('version')}`."
        ),
        "",
        "| split | images | caption | vqa | pope | rec | reasonseg | edit | t2i | chat |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split, st in card["splits"].items():
        it = st["items"]
        row = [
            str(it.get(t, 0))
            for t in ("caption", "vqa", "pope", "rec", "reasonseg", "edit", "t2i", "chat")
        ]
        lines.append(f"| {split} | {st['images']} | " + " | ".join(row) + " |")
    lines += [
        "",
        "## Blind baseline (question text only; VQA accuracy, fitted on train)",
        "",
        "| split | question type | n | majority of type | majority of question | chance "
        "| random guess |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, per in card["blind_baseline"].items():
        for qtype, r in per.items():
            lines.append(
                f"| {split} | {qtype} | {r['n']} | {r['by_type']:.3f} | {r['by_question']:.3f} "
                f"| {r['chance']:.3f} | {r.get('chance_vqa', r['chance']):.3f} |"
            )
    lines += [""]
    if not shapes:
        return "\n".join(lines)
    lines += [
        "POPE negatives: random = any absent colour+shape; popular = the absent ones most",
        "frequent in the split; adversarial = absent ones sharing a colour or shape with a",
        "present object. Masks are visible regions (pycocotools RLE); boxes are xyxy pixels.",
        "",
    ]
    return "\n".join(lines)


def write_card(out_dir: str | Path, card: dict[str, Any]) -> None:
    atomic_write_json(Path(out_dir) / "dataset_card.json", card)
    atomic_write_text(Path(out_dir) / "README.md", card_markdown(card))
