"""A simple baseline model: a small transformer that answers VQA questions from frozen SeTok
tokens and the question's words, trained from scratch on the training split's questions.

It is the control an MLLM's answers are measured against besides the blind and shifted-image
baselines: it says how much of each answer the tokens carry for a model trained on the same
questions. A reader well above blind with an MLLM at blind means the MLLM's training fails to
read tokens that hold the answer (issue 13 found so a Stage III learning rate too high for
LoRA); a reader at blind means the tokens do not hold it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

PAD, UNKNOWN = 0, 1


@dataclass
class TokenReaderConfig:
    """The reader's size and training; `steps` x `batch_size` questions are drawn."""

    width: int = 96
    layers: int = 2
    heads: int = 4
    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-4
    max_tokens: int = 16
    seed: int = 0
    geometry: bool = False  # each token also carries where its cluster lies (as SeTokIM's)


def words(question: str) -> list[str]:
    """Lower-case words and question marks: the reader's question vocabulary."""
    return re.findall(r"[a-z0-9]+|\?", question.lower())


@dataclass
class VQAExamples:
    """Questions with their images' SeTok tokens: tokens (N, K, d), token_mask (N, K)."""

    tokens: Tensor
    token_mask: Tensor
    questions: list[str]
    answers: list[str]
    question_types: list[str]


def pad_tokens(tokens: Tensor, token_mask: Tensor, max_tokens: int) -> tuple[Tensor, Tensor]:
    """(B, K, d) tokens cut or zero-padded to `max_tokens` slots (SeTok's K varies per batch)."""
    b, k, d = tokens.shape
    out = tokens.new_zeros(b, max_tokens, d)
    mask = torch.zeros(b, max_tokens, dtype=torch.bool, device=tokens.device)
    keep = min(k, max_tokens)
    out[:, :keep], mask[:, :keep] = tokens[:, :keep], token_mask[:, :keep].bool()
    return out, mask


def reader_tokens(out: Any, max_tokens: int, geometry: bool) -> tuple[Tensor, Tensor]:
    """A SeTok output as the reader's (B, max_tokens, d) tokens and mask; with `geometry`
    each token is followed by the Fourier features of its cluster's centre, box and size."""
    tokens = out.tokens.float()
    if geometry:
        from setok_tokenizer.geometry import fourier_features, token_geometry

        where = token_geometry(out.masks, out.token_mask.bool())
        tokens = torch.cat([tokens, fourier_features(where)], -1)
    return pad_tokens(tokens, out.token_mask, max_tokens)


@torch.no_grad()
def collect_vqa_examples(
    setok: nn.Module,
    shard_dir: str | Path,
    split: str,
    max_tokens: int,
    batch_size: int = 64,
    geometry: bool = False,
) -> VQAExamples:
    """The VQA questions of `split` (all of each image's, not one per image) with the frozen
    SeTok's tokens of their image. The loader's `expand` drops the last partial batch (fewer
    than `batch_size` questions)."""
    from setokim.data import make_loader

    tokens, masks, questions, answers, types = [], [], [], [], []
    loader = make_loader(shard_dir, split, "vqa", batch_size, shuffle=False, expand=True)
    for batch in tqdm(loader, desc=f"reader tokens ({split})", leave=False):
        tok, mask = reader_tokens(setok.tokenize(batch["pixels"]), max_tokens, geometry)
        tokens.append(tok)
        masks.append(mask)
        questions += list(batch["questions"])
        answers += list(batch["answers"])
        types += list(batch["question_types"])
    if not questions:
        raise ValueError(f"{shard_dir}: split {split!r} has no VQA questions")
    return VQAExamples(torch.cat(tokens), torch.cat(masks), questions, answers, types)


class TokenReader(nn.Module):
    """[CLS] + question words + projected tokens -> a transformer encoder -> answer logits."""

    def __init__(
        self, token_dim: int, vocab: Sequence[str], answers: Sequence[str], cfg: TokenReaderConfig
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab = {w: i + 2 for i, w in enumerate(vocab)}  # 0 pad, 1 unknown
        self.answers = list(answers)
        d = cfg.width
        self.word = nn.Embedding(len(self.vocab) + 2, d, padding_idx=PAD)
        self.position = nn.Embedding(64, d)
        self.project = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, d))
        self.kind = nn.Embedding(3, d)  # cls, word, visual token
        layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, 0.0, batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, len(self.answers))

    def question_ids(self, questions: Sequence[str]) -> Tensor:
        """(B, L) word ids, right-padded with PAD; unseen words are UNKNOWN."""
        ids = [[self.vocab.get(w, UNKNOWN) for w in words(q)][:63] for q in questions]
        out = torch.full((len(ids), max([1, *map(len, ids)])), PAD, dtype=torch.long)
        for row, seq in enumerate(ids):
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out

    def forward(self, tokens: Tensor, token_mask: Tensor, question_ids: Tensor) -> Tensor:
        b, length = question_ids.shape
        text = self.word(question_ids) + self.position.weight[:length] + self.kind.weight[1]
        visual = self.project(tokens) + self.kind.weight[2]
        cls = self.kind.weight[0].expand(b, 1, -1)
        x = torch.cat([cls, text, visual], 1)
        ignore = torch.cat(
            [torch.zeros(b, 1, dtype=torch.bool), question_ids == PAD, ~token_mask.bool()], 1
        )
        return self.head(self.encoder(x, src_key_padding_mask=ignore)[:, 0])

    @torch.no_grad()
    def answer(self, tokens: Tensor, token_mask: Tensor, questions: Sequence[str]) -> list[str]:
        """The most likely training answer for each question."""
        was = self.training
        self.eval()
        logits = self(tokens, token_mask, self.question_ids(questions))
        self.train(was)
        return [self.answers[i] for i in logits.argmax(-1).tolist()]


def fit_token_reader(examples: VQAExamples, cfg: TokenReaderConfig) -> TokenReader:
    """Train a reader from scratch on `examples` (AdamW, batches drawn with `cfg.seed`)."""
    if examples.tokens.shape[1] != cfg.max_tokens:
        raise ValueError(
            f"examples hold {examples.tokens.shape[1]} token slots, cfg {cfg.max_tokens}"
        )
    torch.manual_seed(cfg.seed)
    vocab = sorted({w for q in examples.questions for w in words(q)})
    answers = sorted(set(examples.answers))
    reader = TokenReader(examples.tokens.shape[-1], vocab, answers, cfg)
    index = {a: i for i, a in enumerate(answers)}
    targets = torch.tensor([index[a] for a in examples.answers])
    qids = reader.question_ids(examples.questions)
    opt = torch.optim.AdamW(reader.parameters(), lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in tqdm(range(cfg.steps), desc="token reader", leave=False):
        i = torch.randint(0, len(targets), (cfg.batch_size,), generator=gen)
        loss = F.cross_entropy(
            reader(examples.tokens[i], examples.token_mask[i], qids[i]), targets[i]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return reader.eval()


class TokenReaderAdapter:
    """The eval suite's `understand` for a trained reader over a frozen SeTok: documents'
    images are tokenized and the document's `question` (else the prompt) is answered."""

    def __init__(
        self, reader: TokenReader, setok: nn.Module, image_size: int, batch_size: int = 32
    ) -> None:
        self.reader, self.setok = reader.eval(), setok.eval()
        self.image_size, self.batch_size = image_size, batch_size
        h = hashlib.sha256(repr(asdict(reader.cfg)).encode())
        for module in (reader, setok):
            for name, tensor in sorted(module.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().float().numpy().tobytes())
        self._fingerprint = f"token_reader:{h.hexdigest()[:16]}"

    def fingerprint(self) -> str:
        return self._fingerprint

    def _pixels(self, image: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0
        return F.interpolate(t[None], size=(self.image_size,) * 2, mode="bilinear", antialias=True)

    @torch.no_grad()
    def understand(self, requests: Sequence[Any]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            pixels = torch.cat([self._pixels(r.load_image()) for r in batch])
            cfg = self.reader.cfg
            tokens, mask = reader_tokens(self.setok.tokenize(pixels), cfg.max_tokens, cfg.geometry)
            questions = [str(r.doc.get("question", r.prompt)) for r in batch]
            out += self.reader.answer(tokens, mask, questions)
        return out
