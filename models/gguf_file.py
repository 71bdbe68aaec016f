"""Opening GGUF files once: parsing one (its vocabulary arrays above all) takes seconds, and the config,
the tokenizer and the weights all read the same file."""
from functools import lru_cache
from pathlib import Path

import gguf


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    path = Path(path).resolve()
    return _open(path, path.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _open(path: Path, mtime_ns: int) -> gguf.GGUFReader:  # the mtime makes a rewritten file a new entry
    return gguf.GGUFReader(path)
