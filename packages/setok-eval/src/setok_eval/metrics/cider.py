"""CIDEr-D, numerically identical to pycocoevalcap's `Cider` on the same tokenised input.

The computation is vectorised with sparse matrices so that bootstrap resamples (which change
the document frequencies, hence the idf weights) are cheap: for one n-gram order, with idf
weights w >= 0 and counts h (hypothesis) and r (reference),

    sim(h, r) = sum_g min(h_g, r_g) r_g w_g^2 / (||h * w|| ||r * w||)

and each resample only changes w. Quirks of the reference kept on purpose: the length used by
the Gaussian length penalty is the number of *bigrams* of a sentence, and ngrams never seen in
the references get idf log(N) (document frequency clamped to 1).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from scipy import sparse

_PUNCT_TOKENS = frozenset(
    {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", '"'}
)
_SPLIT = re.compile(r"\.\.\.|--|''|``|[\w]+(?:'[\w]+)?|[^\w\s]")


def tokenize_caption(text: str) -> str:
    """Lowercase and drop punctuation tokens, approximating the COCO PTB tokenizer (Java-free).

    CIDEr scores are only comparable when every system is tokenised the same way; this
    function is what the suite uses for both predictions and references.
    """
    tokens = _SPLIT.findall(text.lower())
    return " ".join(t for t in tokens if t not in _PUNCT_TOKENS)


def _ngrams(sentence: str, n: int) -> list[Counter]:
    words = sentence.split()
    return [
        Counter(tuple(words[i : i + k]) for i in range(len(words) - k + 1)) for k in range(1, n + 1)
    ]


class CiderD:
    """Prepared CIDEr-D computation over a fixed set of documents (one hypothesis each)."""

    def __init__(
        self,
        hypotheses: Sequence[str],
        references: Sequence[Sequence[str]],
        n: int = 4,
        sigma: float = 6.0,
    ) -> None:
        if len(hypotheses) != len(references):
            raise ValueError(
                f"hypotheses ({len(hypotheses)}) and references ({len(references)}) differ in length"
            )
        for i, refs in enumerate(references):
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"references[{i}] must be a non-empty list of strings")
        self.n, self.sigma = n, sigma
        self.num_docs = len(hypotheses)
        hyp_grams = [_ngrams(h, n) for h in hypotheses]
        ref_grams = [[_ngrams(r, n) for r in refs] for refs in references]
        self.pair_doc = np.array(
            [d for d, refs in enumerate(references) for _ in refs], dtype=np.int64
        )
        self.refs_per_doc = np.array([len(refs) for refs in references], dtype=np.float64)
        hyp_len = np.array(
            [sum(g[1].values()) if n > 1 else 0 for g in hyp_grams], dtype=np.float64
        )
        ref_len = np.array(
            [sum(g[1].values()) if n > 1 else 0 for refs in ref_grams for g in refs],
            dtype=np.float64,
        )
        delta = hyp_len[self.pair_doc] - ref_len
        self.penalty = np.exp(-(delta**2) / (2.0 * sigma**2))
        self.orders = [self._prepare_order(k, hyp_grams, ref_grams) for k in range(n)]

    def _prepare_order(self, k: int, hyp_grams: list, ref_grams: list) -> dict:
        vocab: dict[tuple, int] = {}
        for g in hyp_grams:
            for gram in g[k]:
                vocab.setdefault(gram, len(vocab))
        for refs in ref_grams:
            for g in refs:
                for gram in g[k]:
                    vocab.setdefault(gram, len(vocab))
        v = max(len(vocab), 1)
        hyp_rows, hyp_cols, hyp_vals = [], [], []
        for d, g in enumerate(hyp_grams):
            for gram, c in g[k].items():
                hyp_rows.append(d)
                hyp_cols.append(vocab[gram])
                hyp_vals.append(c)
        hyp = sparse.csr_matrix(
            (hyp_vals, (hyp_rows, hyp_cols)), shape=(self.num_docs, v), dtype=np.float64
        )
        rows, cols, vals, mins = [], [], [], []
        df_rows, df_cols = [], []
        pair = 0
        for d, refs in enumerate(ref_grams):
            seen: set[int] = set()
            for g in refs:
                for gram, c in g[k].items():
                    col = vocab[gram]
                    rows.append(pair)
                    cols.append(col)
                    vals.append(c)
                    mins.append(min(c, hyp_grams[d][k].get(gram, 0)))
                    seen.add(col)
                pair += 1
            df_rows.extend([d] * len(seen))
            df_cols.extend(sorted(seen))
        shape = (pair, v)
        ref = sparse.csr_matrix((vals, (rows, cols)), shape=shape, dtype=np.float64)
        clipped = sparse.csr_matrix(
            (np.asarray(mins, dtype=np.float64) * np.asarray(vals, dtype=np.float64), (rows, cols)),
            shape=shape,
        )
        indicator = sparse.csr_matrix(
            (np.ones(len(df_rows)), (df_rows, df_cols)), shape=(self.num_docs, v), dtype=np.float64
        )
        return {
            "hyp_sq": hyp.multiply(hyp).tocsr(),
            "ref_sq": ref.multiply(ref).tocsr(),
            "clipped": clipped,
            "indicator_t": indicator.T.tocsr(),
        }

    def per_doc(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Per-document CIDEr-D with document frequencies counted over a (re)sampled corpus.

        `weights[d]` is how many times document d is in the corpus (all ones by default; a
        bootstrap resample passes its multiplicities). Scores are returned for every document,
        but only those with weight > 0 are meaningful for that corpus.
        """
        m = np.ones(self.num_docs) if weights is None else np.asarray(weights, dtype=np.float64)
        log_n = np.log(float(m.sum()))
        total = np.zeros(len(self.pair_doc))
        for order in self.orders:
            df = order["indicator_t"] @ m
            w2 = (log_n - np.log(np.maximum(1.0, df))) ** 2
            num = order["clipped"] @ w2
            hyp_norm = np.sqrt(order["hyp_sq"] @ w2)[self.pair_doc]
            ref_norm = np.sqrt(order["ref_sq"] @ w2)
            den = hyp_norm * ref_norm
            val = np.where(den != 0, num / np.where(den != 0, den, 1.0), num)
            total += val * self.penalty
        per_pair = total / self.n
        sums = np.bincount(self.pair_doc, weights=per_pair, minlength=self.num_docs)
        return sums / self.refs_per_doc * 10.0

    def score(self, weights: np.ndarray | None = None) -> float:
        """Corpus CIDEr-D: the (weighted) mean of per-document scores."""
        m = np.ones(self.num_docs) if weights is None else np.asarray(weights, dtype=np.float64)
        return float(np.sum(self.per_doc(m) * m) / m.sum())


def cider_d(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D of tokenised captions: (corpus score, per-item scores), keys of `references`.

    Inputs must already be tokenised (space-separated tokens), e.g. by `tokenize_caption`.
    """
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        raise ValueError(
            f"predictions and references must have the same ids; missing predictions for "
            f"{missing[:5]}, predictions without references {extra[:5]}"
        )
    if not references:
        raise ValueError("references is empty")
    ids = list(references)
    scorer = CiderD([predictions[i] for i in ids], [references[i] for i in ids], n=n, sigma=sigma)
    per_doc = scorer.per_doc()
    return float(per_doc.mean()), dict(zip(ids, per_doc.tolist(), strict=True))
