"""MME scores (acc and acc+ per subtask) with the MME script's yes/no parsing rule."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def parse_mme_answer(text: str) -> str:
    """ "yes", "no" or "other": exact yes/no, else look for them in the first four characters."""
    answer = text.strip().lower() if isinstance(text, str) else ""
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


@dataclass(frozen=True)
class MMEItem:
    """One MME question: two questions (one yes, one no) share an image within a subtask."""

    subtask: str
    image_id: str
    prediction: str
    answer: str


def mme_image_states(items: Sequence[MMEItem]) -> tuple[list[str], np.ndarray]:
    """Group questions by (subtask, image): rows (subtask index, #correct, #questions, all correct).

    Bootstrap and paired tests resample these rows: acc+ is defined per image, so the image
    (not the question) is the unit.
    """
    groups: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for i, item in enumerate(items):
        gold = item.answer.strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"items[{i}].answer must be 'yes' or 'no', got {item.answer!r}")
        groups[(item.subtask, str(item.image_id))].append(parse_mme_answer(item.prediction) == gold)
    subtasks = sorted({s for s, _ in groups})
    index = {s: i for i, s in enumerate(subtasks)}
    rows = [(index[s], sum(c), len(c), float(all(c))) for (s, _), c in sorted(groups.items())]
    return subtasks, np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def mme_from_states(states: np.ndarray, subtasks: Sequence[str] | None = None) -> dict[str, float]:
    """Per-subtask score = 100 * (acc + acc+); "total" = sum over subtasks present."""
    states = np.asarray(states, dtype=np.float64).reshape(-1, 4)
    out: dict[str, float] = {}
    total = 0.0
    for s in np.unique(states[:, 0]).astype(int):
        rows = states[states[:, 0] == s]
        acc = rows[:, 1].sum() / rows[:, 2].sum()
        acc_plus = rows[:, 3].mean()
        name = subtasks[s] if subtasks is not None else str(s)
        out[f"{name}/acc"] = float(acc * 100)
        out[f"{name}/acc_plus"] = float(acc_plus * 100)
        out[f"{name}/score"] = float((acc + acc_plus) * 100)
        total += (acc + acc_plus) * 100
    out["total"] = float(total)
    return out


def mme_scores(items: Sequence[MMEItem]) -> dict[str, float]:
    """MME acc, acc+ and score per subtask plus the total score."""
    subtasks, states = mme_image_states(items)
    return mme_from_states(states, subtasks)
