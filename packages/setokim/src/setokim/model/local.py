"""Load transformers weights and tokenizers from local directories only.

Every `from_pretrained` of a weights or tokenizer directory in setokim goes through
`load_local`: a compute node without network must fail at once naming the path, not
wait on a Hub lookup (or download something else) because a `SETOK_*` variable was unset
and the path became a relative name that looks like a Hub repo id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_local(loader: Any, path: str | os.PathLike[str], what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(path, local_files_only=True, **kwargs)` after checking that
    `path` is a local directory; `what` names the setting in the error (e.g. "llm.pretrained_path")."""
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"{what} {str(path)!r} is not a local directory (weights and tokenizers load "
            "from local paths only; nothing is downloaded)"
        )
    return loader.from_pretrained(str(path), local_files_only=True, **kwargs)


def load_text_tokenizer(path: str | os.PathLike[str], what: str = "text tokenizer") -> Any:
    """The transformers tokenizer saved in the local directory `path`."""
    from transformers import AutoTokenizer

    return load_local(AutoTokenizer, path, what)
