"""Fault injection for server tests: a `python -m server` started with this folder on PYTHONPATH and
- NANOSERVE_FAIL_ON_TOKEN=<id> has a model runner that raises on any step carrying a prompt with that token id,
  which kills the engine loop as a real device or kernel error would;
- NANOSERVE_HANG_ON_TOKEN=<id> has one whose step carrying such a prompt never returns, as a hung kernel's;
- NANOSERVE_STEP_DELAY=<seconds> spends that much longer on every step, so that a test's timing does not depend on
  how fast the machine decodes;
- NANOSERVE_LOAD_DELAY=<seconds> takes that much longer to load the model."""
import functools
import os
import time

STEP_FAULTS = ("NANOSERVE_FAIL_ON_TOKEN", "NANOSERVE_HANG_ON_TOKEN", "NANOSERVE_STEP_DELAY")


def _before(cls, name: str, action) -> None:
    """Run `action(*args)` before every call of `cls.name`."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        action(*args)
        return original(*args, **kwargs)
    setattr(cls, name, wrapped)


def _carries(batch, variable: str) -> bool:
    """Whether the batch holds a prompt with the token id that the environment variable names."""
    return variable in os.environ and any(int(os.environ[variable]) in seq.prompt_token_ids for seq in batch.seqs)


def _faulty_step(_, batch) -> None:
    if _carries(batch, "NANOSERVE_FAIL_ON_TOKEN"):
        raise RuntimeError("injected fault: the device is gone")
    while _carries(batch, "NANOSERVE_HANG_ON_TOKEN"):
        time.sleep(3600)
    time.sleep(float(os.environ.get("NANOSERVE_STEP_DELAY", 0)))


if any(variable in os.environ for variable in STEP_FAULTS):
    from engine.runner import ModelRunner
    _before(ModelRunner, "execute", _faulty_step)

if "NANOSERVE_LOAD_DELAY" in os.environ:
    from engine.engine import LLMEngine
    _before(LLMEngine, "__init__", lambda *_: time.sleep(float(os.environ["NANOSERVE_LOAD_DELAY"])))
