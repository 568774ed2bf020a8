"""Image-editing pairs -> shards (image, instruction, ``target.*`` image).

InstructPix2Pix (the released generated dataset): one folder per prompt with
``prompt.json`` ({"input", "edit", "output"} captions/instruction) and image pairs
``{seed}_0.jpg`` (before) / ``{seed}_1.jpg`` (after); every seed becomes one sample.
MagicBrush (the released dev/test archive): ``edit_sessions.json`` =
{img_id: [{"input": file, "mask": file, "output": file, "instruction": str}, ...]} and images
under ``images/{img_id}/``; every turn becomes one sample. Every field is checked against
these schemas; a bad record names the file, the record (folder's prompt / seed, image id and
turn) and the field, or is counted and skipped with `skip_bad`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from setokim.data.converters.common import (
    Converted,
    Records,
    load_json,
    optional,
    read_image,
    require,
    write_split,
)
from setokim.data.schema import EditItem, SampleAnnotation
from setokim.data.shards import safe_key


def _pair(
    key: str,
    src: Path,
    dst: Path,
    instruction: str,
    source: str,
    captions: list[str],
    meta: dict[str, Any],
) -> Converted:
    data, ext, w, h = read_image(src)
    tdata, text, tw, th = read_image(dst)
    if (tw, th) != (w, h):
        raise ValueError(f"{key}: target {dst.name} is {tw}x{th}, source {src.name} is {w}x{h}")
    ann = SampleAnnotation(
        key=key,
        width=w,
        height=h,
        source=source,
        captions=captions,
        edit=[EditItem(instruction, "instruction")],
        meta=meta,
    )
    return Converted(ann, data, ext, tdata, text)


def iter_instructpix2pix(root: str | Path, records: Records | None = None) -> Iterator[Converted]:
    records = records or Records()
    root = Path(root)
    folders = sorted(p.parent for p in root.rglob("prompt.json"))
    if not folders:
        raise ValueError(f"root {str(root)!r} has no */prompt.json (InstructPix2Pix layout)")
    for folder in folders:
        prompt_path = folder / "prompt.json"
        seeds = sorted(p.name[: -len("_0.jpg")] for p in folder.glob("*_0.jpg"))
        ok = False
        with records.record(prompt_path, "prompt"):  # the folder's record: all its seeds
            prompt = load_json(prompt_path)
            for name in ("input", "edit", "output"):  # official: all three captions
                require(prompt, name, str)
            if not seeds:
                raise ValueError("no {seed}_0.jpg / {seed}_1.jpg image pair next to it")
            ok = True
        if not ok:
            continue  # skipped (skip_bad): counted and reported
        for seed in seeds:
            before, after = folder / f"{seed}_0.jpg", folder / f"{seed}_1.jpg"
            key = safe_key(f"ip2p-{folder.relative_to(root).as_posix()}-{seed}")
            with records.record(prompt_path, f"seed {seed}"):
                yield _pair(
                    key,
                    before,
                    after,
                    prompt["edit"],
                    "instructpix2pix",
                    [prompt["input"]],
                    {"output_caption": prompt["output"]},
                )


def iter_magicbrush(root: str | Path, records: Records | None = None) -> Iterator[Converted]:
    records = records or Records()
    root = Path(root)
    sessions_path = root / "edit_sessions.json"
    if not sessions_path.is_file():
        raise FileNotFoundError(f"root {str(root)!r} has no edit_sessions.json (MagicBrush layout)")
    sessions = load_json(sessions_path)
    if not isinstance(sessions, dict):
        raise ValueError(
            f"{sessions_path}: expected an object {{img_id: [turns]}}, got {type(sessions).__name__}"
        )
    for img_id in sorted(sessions):
        turns = sessions[img_id]
        ok = False
        with records.record(sessions_path, img_id):
            if not isinstance(turns, list):
                raise TypeError(f"field {img_id!r}: expected a list of turns, got {turns!r:.60}")
            ok = True
        if not ok:
            continue  # skipped (skip_bad): counted and reported
        for turn, t in enumerate(turns):
            folder = root / "images" / img_id
            key = safe_key(f"magicbrush-{img_id}-{turn}")
            with records.record(sessions_path, f"{img_id} turn {turn}"):
                prefix = f"{img_id}[{turn}]."
                for name in ("input", "output", "instruction"):
                    require(t, name, str, prefix=prefix)
                optional(t, "mask", str, prefix=prefix)
                yield _pair(
                    key,
                    folder / t["input"],
                    folder / t["output"],
                    t["instruction"],
                    "magicbrush",
                    [],
                    {"img_id": img_id, "turn": turn},
                )


def convert_edit_pairs(
    root: str | Path, out_dir: str | Path, split: str, *, layout: str,
    samples_per_shard: int = 1000, progress: bool = False, overwrite: bool = False,
    skip_bad: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """`layout` = "instructpix2pix" or "magicbrush"."""
    iters = {"instructpix2pix": iter_instructpix2pix, "magicbrush": iter_magicbrush}
    if layout not in iters:
        raise ValueError(f"layout must be one of {sorted(iters)}, got {layout!r}")
    records = Records(skip_bad)
    return write_split(
        out_dir,
        split,
        iters[layout](root, records),
        source=layout,
        samples_per_shard=samples_per_shard,
        progress=progress,
        overwrite=overwrite,
        records=records,
    )
