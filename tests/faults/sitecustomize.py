"""Fault injection for server tests: a `python -m server` started with this folder on PYTHONPATH and
NANOSERVE_FAIL_ON_TOKEN=<id> has a model runner that raises on any step carrying a prompt with that
token id, which kills the engine loop as a real device or kernel error would."""
import os

if "NANOSERVE_FAIL_ON_TOKEN" in os.environ:
    from engine.runner import ModelRunner

    _poison = int(os.environ["NANOSERVE_FAIL_ON_TOKEN"])
    _execute = ModelRunner.execute

    def _failing_execute(self, batch):
        if any(_poison in seq.prompt_token_ids for seq in batch.seqs):
            raise RuntimeError("injected fault: the device is gone")
        return _execute(self, batch)

    ModelRunner.execute = _failing_execute
