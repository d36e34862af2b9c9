"""Loaded by a test run's interpreters (this folder first on PYTHONPATH): records, in the trainer
processes only, every change of who holds device memory and what ran in between, one line per
event in `$RIFT_TEST_MEMORY_LOG.<rank>`:

    sleep(level)  wake(tags)   the engine's memory changed (vLLM's calls on a GPU; bookkeeping on CPU)
    offload  reload            the trainer's parts left / came back
    load  generate  logprobs   the engine loaded pushed weights / sampled / computed log-probs
    train  checkpoint          an optimizer step / a checkpoint save

Calls that change nothing (waking what is awake, reloading what is resident) are not recorded.
The patches go in when `rift_megatron.training.loop` is first imported, so launchers, verifier
workers and checkpoint helpers are untouched.
"""

import importlib.abc
import importlib.util
import os
import sys

_LOG = os.environ["RIFT_TEST_MEMORY_LOG"]


def _record(event):
    with open(f"{_LOG}.{os.environ.get('RANK', '0')}", "a") as out:
        out.write(event + "\n")


def _wrap(owner, name, event, changed=None):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        before = changed(args[0]) if changed else None
        result = original(*args, **kwargs)
        if changed is None or changed(args[0]) != before:
            _record(event(*args, **kwargs) if callable(event) else event)
        return result

    setattr(owner, name, wrapper)


def _patch(loop):
    from rift_megatron.rollout.engine import RolloutEngine
    from rift_megatron.training.offload import TrainerOffload

    engine_state = lambda engine: (frozenset(engine._asleep), engine.weights_discarded)
    _wrap(RolloutEngine, "sleep", lambda self, level=1: f"sleep({level})", engine_state)
    _wrap(RolloutEngine, "wake_up", lambda self, tags=None: f"wake({','.join(tags or ['all'])})", engine_state)
    _wrap(RolloutEngine, "load_weights", "load")
    _wrap(RolloutEngine, "generate", "generate")
    _wrap(RolloutEngine, "prompt_logprobs", "logprobs")
    _wrap(TrainerOffload, "offload", "offload", lambda self: self.offloaded)
    _wrap(TrainerOffload, "reload", "reload", lambda self: self.offloaded)
    _wrap(loop, "train_step", "train")
    _wrap(loop, "save_training_checkpoint", "checkpoint")


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "rift_megatron.training.loop":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
