"""A tiny offline text tokenizer for CPU runs, and special-token setup for any tokenizer.

WordPiece over a constructed vocabulary: whole words for a base English/Shapes World word
list (plus any words from `texts`), and every printable ASCII character both as a word
start and as a `##` continuation, so any ASCII text encodes without `<unk>`. Digits are
split one per piece, which keeps box coordinates like "[12,40,30,63]" cheap to learn.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BASE_WORDS = """
a an the is are was were be of in on at to from with and or not no yes this that these
there it its what which who where how many much color colour shape size object objects
image picture photo scene show shows draw generate make edit change turn replace remove
add into left right above below top bottom middle center centre behind front next near
far of large small big tiny medium red green blue yellow purple orange pink brown black
white gray grey cyan magenta circle circles square squares triangle triangles star stars
ellipse rectangle hexagon diamond cross heart background textured striped dotted plain
one two three four five six seven eight nine ten zero segment find locate box region
the caption describe question answer please can you do does than more fewer same
different touching overlapping only all any each other
""".split()


def build_text_tokenizer(
    texts: Iterable[str] = (), extra_words: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Build the tiny WordPiece tokenizer from the base words plus the words in `texts`."""
    vocab: dict[str, int] = {}
    for tok in ("<pad>", "<unk>", "<s>", "</s>"):
        vocab[tok] = len(vocab)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    words = list(BASE_WORDS) + list(extra_words)
    for text in texts:
        words.extend(w for w in re.findall(r"[a-z]+", text.lower()))
    for piece in list(chars) + ["##" + c for c in chars] + words:
        vocab.setdefault(piece, len(vocab))
    core = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=200))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="right",
    )


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> int:
    """Register `tokens` (e.g. [Img], [/Img], role markers) as special; returns how many were new.

    A pad token is set to the eos/unk token when the tokenizer has none (Llama's case).
    """
    missing = [t for t in tokens if t and t not in tokenizer.get_vocab()]
    added = 0
    if missing:
        added = tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return added


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of a single special token; raises if it is not one token of the vocabulary."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ValueError(f"token {token!r} is not in the text tokenizer's vocabulary")
    return vocab[token]
