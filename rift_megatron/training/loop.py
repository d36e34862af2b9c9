"""The RIFT trainer: offline (a scored buffer) and online (rollout -> reward -> train -> sync).

Online, one iteration: the co-located engines sample k responses for `data.prompts_per_step`
prompts, the verifier scores them, every data-parallel rank takes its share, and
`training.epochs_per_rollout` passes over it are made in optimizer steps of
`training.global_batch_size` samples; then the new weights are pushed into the engines (and
checked), evaluation and checkpoints happen at their intervals. Checkpoints are taken only at
iteration boundaries, where the whole loop state is the trainer state plus the sampler.
Offline: the buffer's samples are drawn `global_batch_size` at a time by the same seeded,
resumable sampler; one optimizer step each.
Device memory moves between trainer and engine around every generation (`training/handoff.py`):
each phase below asks for what it needs (`for_training` / `for_generation`).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from rift_megatron.config import (
    RiftConfig,
    dump_yaml,
    model_folder,
    sync_check_tolerance,
    to_checkpoint_writer,
    to_engine_config,
    to_loss_settings,
    to_offload_parts,
    to_optim_config,
    to_parallel_layout,
    to_precision_config,
    to_reward_spec,
    to_sampling_config,
    validate_for_world,
)
from rift_megatron.config.checks import response_lengths
from rift_megatron.config.runtime import to_overlap_request, to_recompute_config
from rift_megatron.convert.checkpoint_files import resolve_checkpoint
from rift_megatron.data.lengths import length_budget, model_positions, render_within_budget
from rift_megatron.data.prompts import load_prompts
from rift_megatron.data.sampler import PromptSampler
from rift_megatron.hf_folder import load_tokenizer
from rift_megatron.models.hf_config import load_hf_config
from rift_megatron.parallel import (
    destroy_model_parallel,
    init_distributed,
    init_model_parallel,
    init_rollout_wait_group,
    is_main_rank,
    standalone_environment,
)
from rift_megatron.platform.memory import memory_metrics
from rift_megatron.rollout.batching import Sample, build_train_batch
from rift_megatron.training.checkpoint import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from rift_megatron.training.errors import NonFiniteTrainingError, TrainingInterrupted
from rift_megatron.training.handoff import MemoryHandoff
from rift_megatron.training.interrupts import StopRequest
from rift_megatron.training.offload import TrainerOffload
from rift_megatron.training.phases import in_phase
from rift_megatron.training.metrics import MetricsLogger
from rift_megatron.training.preflight import check_checkpoint_dir, checkpoint_bytes, model_parameters
from rift_megatron.training.setup import setup_training
from rift_megatron.training.step import train_step


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def initial_checkpoint(cfg: RiftConfig) -> Path:
    """`model.mcore_ckpt` (a checkpoint, or a run directory: its `latest`), or `hf_dir` converted
    once into the run directory by global rank 0 while the others wait (`logging.dir` must be on
    a file system every node sees). The conversion runs in a subprocess with the launcher's
    variables removed: it is a world of its own (inheriting torchrun's RANK / MASTER_* it would
    join the trainer's rendezvous and hang), split over as many processes as this node has ranks
    (they are idle until it is done)."""
    if cfg.model.mcore_ckpt:
        return resolve_checkpoint(cfg.model.mcore_ckpt)
    target = Path(cfg.logging.dir) / "initial_mcore"
    if is_main_rank() and not (target / "metadata.json").is_file():
        nproc = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        command = [sys.executable, "-m", "rift_megatron.cli", "convert", "hf-to-mcore",
                   "--hf", cfg.model.hf_dir, "--out", str(target), "--overwrite", "--nproc", str(nproc)]
        result = subprocess.run(command, capture_output=True, text=True, env=standalone_environment())
        if result.returncode != 0:
            raise RuntimeError(f"converting {cfg.model.hf_dir} failed:\n{result.stderr[-3000:]}")
    _barrier()
    return target


class Trainer:
    """Builds everything from a validated config; `run()` trains to `training.steps`."""

    def __init__(self, cfg: RiftConfig) -> None:
        self.cfg = cfg
        timeout = timedelta(minutes=cfg.parallel.collective_timeout_minutes)
        init_distributed(timeout)
        self.dp_size = validate_for_world(cfg, dist.get_world_size())
        self.model_folder = model_folder(cfg)
        self.arch = load_hf_config(self.model_folder)
        self._read_prompts()  # before the model is converted or built: a prompt too long costs a second
        self.buffer = self._read_buffer()  # likewise a bad offline buffer
        resume_from = self._resume_checkpoint()
        # A resume overwrites every weight: the initial ones are then neither converted nor loaded.
        initial = None if resume_from is not None else initial_checkpoint(cfg)
        layout = to_parallel_layout(cfg)
        init_model_parallel(layout, seed=cfg.training.seed, timeout_minutes=cfg.parallel.collective_timeout_minutes)
        self.checkpoints = to_checkpoint_writer(cfg)
        if cfg.data.mode == "online" or cfg.eval.prompts:  # rollouts and the split evaluation wait in it
            init_rollout_wait_group(timedelta(minutes=cfg.rollout.wait_timeout_minutes))
        from megatron.core import parallel_state as ps

        self.dp_rank = ps.get_data_parallel_rank()
        self.state = setup_training(self.arch, layout, to_optim_config(cfg), to_precision_config(cfg),
                                    total_steps=cfg.training.steps, initial_weights=initial,
                                    layer_impl=cfg.model.layer_impl, recompute=to_recompute_config(cfg),
                                    overlap=to_overlap_request(cfg))
        if cfg.checkpoint.dir:  # refuse now a directory the first checkpoint could not be written to
            parameters, weight_bytes = model_parameters(self.state.unwrapped_chunks(), ps.get_model_parallel_group())
            needed = checkpoint_bytes(parameters, weight_bytes, cfg.optim.use_distributed_optimizer)
            check_checkpoint_dir(cfg.checkpoint.dir, needed)
        self.settings = to_loss_settings(cfg)
        self.sync_tolerance = sync_check_tolerance(cfg)
        self.hf_assets = Path(self.model_folder)  # config + tokenizer files, copied into every checkpoint
        self.rollout_step = 0
        self.nonfinite_in_a_row = 0
        self._sampler_state = None
        self.resumed = resume_from is not None
        if resume_from is not None:
            payload = load_training_checkpoint(resume_from, self.state, fully_parallel=cfg.checkpoint.fully_parallel_load)
            self.rollout_step, self._sampler_state = payload["rollout_step"], payload["sampler"]
        wandb_run = ({"project": cfg.logging.wandb_project, "name": cfg.logging.wandb_run_name, "config": asdict(cfg)}
                     if cfg.logging.wandb else None)
        self.logger = MetricsLogger(cfg.logging.dir, enabled=is_main_rank(), tensorboard=cfg.logging.tensorboard,
                                    total_steps=cfg.training.steps, resume_step=self.state.step,
                                    console_interval=cfg.logging.log_interval, wandb_run=wandb_run)
        if is_main_rank():
            Path(cfg.logging.dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.logging.dir) / "config.yaml").write_text(dump_yaml(cfg))
            print(f"resolved config{' (resumed from ' + str(resume_from) + ')' if resume_from else ''}:\n{dump_yaml(cfg)}")
            print(f"kernels and overlap ({self.state.provider.platform.kind}): {self.state.provider.options.table()}")
        self._build_data()

    # ---- set-up ---------------------------------------------------------------------------

    def _resume_checkpoint(self) -> Path | None:
        resume, directory = self.cfg.checkpoint.resume, self.cfg.checkpoint.dir
        if resume == "none":
            return None
        if resume == "auto":
            return latest_checkpoint(directory) if directory else None
        return Path(resume)

    def _read_prompts(self) -> None:
        """The tokenizer and the prompt files' token ids, every prompt checked to leave its
        response length (rollout.max_tokens, eval.max_tokens) in the context."""
        cfg = self.cfg
        self.tokenizer = load_tokenizer(self.model_folder, "model.hf_dir" if cfg.model.hf_dir else "model.mcore_ckpt")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.prompt_ids, self.eval_ids = [], []
        (rollout_tokens, rollout_key, online), (eval_tokens, eval_key, evaluates) = response_lengths(cfg)

        def read(path: str, max_tokens: int, key: str) -> tuple[list, list[list[int]]]:
            records = load_prompts(path, prompt_field=cfg.data.prompt_field, answer_field=cfg.data.answer_field)
            budget = length_budget(self.model_folder, max_tokens, key, max_model_len=cfg.rollout.max_model_len,
                                   max_model_len_name="rollout.max_model_len")
            return records, render_within_budget(self.tokenizer, records, budget, chat_template=cfg.data.chat_template)

        if online:
            self.records, self.prompt_ids = read(cfg.data.prompts, rollout_tokens, rollout_key)
        if evaluates:
            self.eval_records, self.eval_ids = read(cfg.eval.prompts, eval_tokens, eval_key)

    def _read_buffer(self) -> list | None:
        """The offline buffer's rows, checked (rift_megatron.rollout.buffer.load_buffer); None online."""
        if self.cfg.data.mode != "offline":
            return None
        from rift_megatron.rollout.buffer import load_buffer

        return load_buffer(self.cfg.data.buffer)

    def _build_data(self) -> None:
        cfg = self.cfg
        if cfg.data.mode == "online":
            self.sampler = PromptSampler(len(self.records), cfg.data.prompts_per_step, seed=cfg.training.seed, shuffle=cfg.data.shuffle)
        else:
            self.sampler = PromptSampler(len(self.buffer), cfg.training.global_batch_size, seed=cfg.training.seed, shuffle=cfg.data.shuffle)
        if self._sampler_state is not None:
            self.sampler.load_state_dict(self._sampler_state)
        self.engine = self.pool = self.handoff = None
        if cfg.data.mode == "online" or cfg.eval.prompts:
            from rift_megatron.rollout.engine import RolloutEngine
            from rift_megatron.rollout.verifier_pool import VerifierPool

            longest_prompt = max(len(ids) for ids in self.prompt_ids + self.eval_ids)
            longest_response = max(cfg.rollout.max_tokens, cfg.eval.max_tokens or 0)
            # Each prompt fits with its own response length (checked); the longest pair may not.
            positions = model_positions(self.model_folder)
            length = min(longest_prompt + longest_response, positions[0] if positions else math.inf)
            # Built while the trainer is offloaded: vLLM sizes its KV cache from the device memory
            # free at start (rollout.gpu_memory_utilization), which the trainer gives back anyway.
            offload = TrainerOffload(self.state, to_offload_parts(cfg))
            offload.offload()
            self.engine = RolloutEngine(to_engine_config(cfg, max_model_len=int(length), resuming=self.resumed))
            self.pool = VerifierPool(to_reward_spec(cfg))
            self.handoff = MemoryHandoff(self.engine, offload, push=self._sync)

    # ---- pieces of an iteration -------------------------------------------------------------

    @in_phase("training step")
    def _train_on(self, batch: dict, extra: dict, history: list, after_push: bool = False) -> None:
        """Optimizer steps over this rank's share `batch` in global batches; log each.

        The co-located engine sleeps meanwhile and the trainer's offloaded parts come back
        (`MemoryHandoff.for_training`; their timings join the first step's metrics).
        `after_push`: `batch` was sampled by the engine right after a weight push, so the first
        step's recomputed log-probs of the sampled tokens check that push before the weights move.
        """
        if self.handoff is not None:
            extra = {**extra, **self.handoff.for_training()}
        per_rank = self.cfg.training.global_batch_size // self.dp_size
        samples = batch["tokens"].shape[0]
        check = self._push_check if after_push and self.sync_tolerance is not None else None
        for _ in range(self.cfg.training.epochs_per_rollout):
            for start in range(0, samples, per_rank):
                if self.state.step >= self.cfg.training.steps:
                    return
                chunk = {key: value[start:start + per_rank] for key, value in batch.items()}
                started = time.perf_counter()
                metrics = train_step(self.state, chunk, self.settings, self.cfg.training.micro_batch_size, check=check,
                                     max_tokens_per_micro_batch=self.cfg.training.max_tokens_per_micro_batch)
                metrics.update(extra, train_seconds=time.perf_counter() - started, **memory_metrics())
                history.append(metrics)
                self.logger.log(metrics)
                extra, check = {}, None
                self._count_nonfinite(metrics)
                self._finish_checkpoints()

    def _count_nonfinite(self, metrics: dict) -> None:
        """Stop after `training.max_consecutive_nonfinite` skipped non-finite steps in a row,
        keeping the last good weights (the skipped steps did not change them)."""
        if not metrics["nonfinite"]:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        limit = self.cfg.training.max_consecutive_nonfinite
        if is_main_rank():
            print(f"step {self.state.step}: non-finite gradients (loss {metrics.get('loss')}): step skipped, weights "
                  f"unchanged ({self.nonfinite_in_a_row} in a row, training.max_consecutive_nonfinite {limit})", flush=True)
        if self.nonfinite_in_a_row < limit:
            return
        first = self.state.step - self.nonfinite_in_a_row + 1
        kept = (f"the last good weights (step {first - 1}) saved to {self._checkpoint()}" if self.cfg.checkpoint.dir
                else "nothing saved (checkpoint.dir is not set)")
        raise NonFiniteTrainingError(
            f"steps {first}-{self.state.step} all had non-finite gradients and were skipped "
            f"(training.max_consecutive_nonfinite {limit}): stopped; {kept}. Lower optim.lr or check the data "
            "(rewards, buffer) before resuming")

    def _stop_for_signal(self, signum: int, last_checkpoint: int) -> None:
        name = TrainingInterrupted.signal_name(signum)
        self._finish_checkpoints(wait=True)  # a background write of the last checkpoint completes first
        if not self.cfg.checkpoint.dir:
            kept = "nothing saved (checkpoint.dir is not set)"
        elif last_checkpoint == self.state.step:
            kept = f"the checkpoint of step {self.state.step} is in {self.cfg.checkpoint.dir}; continue with --resume auto"
        else:
            kept = f"checkpoint saved to {self._checkpoint()}; continue with --resume auto"
        raise TrainingInterrupted(f"stopped by {name} at step {self.state.step}: {kept}", signum)

    def _push_check(self, metrics: dict) -> None:
        """The sync check on a rollout's sampled tokens (the step's trainer-vs-behaviour stats)."""
        from rift_megatron.rollout.weight_sync import LogprobMismatch, check_mismatch

        mismatch = LogprobMismatch(mean=metrics["logprob_diff_mean"], max=metrics["logprob_diff_max"],
                                   mult_error=metrics["token_mult_prob_error"], tokens=int(metrics["response_tokens"]))
        check_mismatch(mismatch, self.sync_tolerance, f"weight push before step {self.state.step + 1}")

    @in_phase("weight push")
    def _sync(self) -> dict:
        from rift_megatron.rollout.weight_sync import push_weights

        reloaded = self.handoff.for_training()
        stats = push_weights(self.engine, self.state.unwrapped_chunks(), self.arch,
                             bucket_bytes=self.cfg.rollout.sync_bucket_mb * 2**20, path=self.cfg.rollout.sync_path)
        return {**reloaded, "sync_seconds": stats.seconds, "sync_bytes": float(stats.bytes), "sync_buckets": float(stats.buckets),
                "sync_received_bytes": float(stats.received_bytes)}

    def _probe_check(self) -> dict:
        """Offline runs push only to evaluate, and no rollout follows to check the push on: compare
        the engine's and the trainer's log-probs of one buffer sample's response instead."""
        from rift_megatron.rollout.weight_sync import check_mismatch, probe_mismatch
        from rift_megatron.training.forward import sequence_logprobs

        row = self.buffer[0]
        probe = torch.tensor([list(row.prompt_ids) + list(row.response_ids)], dtype=torch.long)
        trainer = sequence_logprobs(self.state.model, probe, self.arch.vocab_size)
        mask = torch.zeros(1, probe.shape[1] - 1)
        mask[:, len(row.prompt_ids) - 1:] = 1.0  # position t-1 predicts token t: the response tokens
        self.handoff.for_generation()
        mismatch = probe_mismatch(self.engine, trainer, probe, mask)
        check_mismatch(mismatch, self.sync_tolerance, f"weight push for the evaluation at step {self.state.step}")
        return {"sync_logprob_diff_mean": mismatch.mean, "sync_logprob_diff_max": mismatch.max}

    @in_phase("evaluation")
    def _evaluate(self) -> dict:
        from rift_megatron.rollout.evaluate import evaluate

        if self.cfg.data.mode == "offline" and self.state.step > 0:
            self._sync()  # offline training never pushes otherwise: evaluate the current weights
            if self.sync_tolerance is not None:
                self._probe_check()

        max_tokens = self.cfg.eval.max_tokens or self.cfg.rollout.max_tokens
        self.handoff.for_generation()
        result = evaluate(self.engine, self.eval_records, self.eval_ids, self.pool, max_tokens=max_tokens,
                          k=self.cfg.eval.k, temperature=self.cfg.eval.temperature, step=10**6 + self.state.step,
                          engine_tp=self.cfg.rollout.engine_tensor_parallel)
        metrics = {"eval_accuracy": result["pass@1_greedy"]}
        if self.cfg.eval.k > 1:
            metrics[f"eval_pass@{self.cfg.eval.k}"] = result[f"pass@{self.cfg.eval.k}"]
        return metrics

    @in_phase("checkpoint save")
    def _checkpoint(self, wait: bool = True) -> Path:
        """Save; `wait=False` lets a background writer finish during the next steps."""
        if self.handoff is not None:
            self.handoff.for_training()
        directory = save_training_checkpoint(
            self.cfg.checkpoint.dir, self.state,
            {"rollout_step": self.rollout_step, "sampler": self.sampler.state_dict()},
            dump_yaml(self.cfg), hf_assets=self.hf_assets, keep_last=self.cfg.checkpoint.keep_last or 0,
            writer=self.checkpoints, optimizer_format=self.cfg.checkpoint.optimizer_format,
        )
        if wait:
            self.checkpoints.wait()
        return directory

    @in_phase("checkpoint save")
    def _finish_checkpoints(self, wait: bool = False) -> None:
        """Rename into place (and point `latest` at) the background writes every rank has finished;
        `wait`: block until all have."""
        if wait:
            self.checkpoints.wait()
        else:
            self.checkpoints.poll()

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> list[dict]:
        """Train to `training.steps`; returns the per-step metrics logged by this run. SIGTERM /
        SIGINT stop it at the next safe point with a checkpoint (TrainingInterrupted)."""
        with StopRequest() as stop:
            return self._run(stop)

    def _run(self, stop: StopRequest) -> list[dict]:
        cfg, history = self.cfg, []
        pending: dict = {}
        if self.engine is not None:
            # the engine starts from hf_dir's weights (or none at all: mcore_ckpt alone, or a resume)
            pending.update(self._sync())
            if cfg.data.mode == "offline" and self.sync_tolerance is not None:
                pending.update(self._probe_check())
            if cfg.eval.prompts and self.state.step == 0:
                pending.update({f"initial_{k}": v for k, v in self._evaluate().items()})
        last_checkpoint, last_evaluation = self.state.step, None
        while self.state.step < cfg.training.steps:
            before = self.state.step
            if cfg.data.mode == "online":
                handed = self.handoff.for_generation()
                rollout = self._rollout_batch()
                self._train_on(rollout.train_batch, {**pending, **handed, **rollout.metrics}, history, after_push=True)
                pending = self._sync()
            else:
                indices = PromptSampler.shard(self.sampler.next_batch(), self.dp_rank, self.dp_size)
                batch = build_train_batch([self._buffer_sample(i) for i in indices], pad_id=self.pad_id)
                self._train_on(batch, pending, history)
                pending = {}
            crossed = lambda interval: interval > 0 and before // interval != self.state.step // interval
            if cfg.eval.prompts and crossed(cfg.eval.interval):
                evaluation = last_evaluation = self._evaluate()
                if history:
                    history[-1].update(evaluation)
                self.logger.log({"step": self.state.step, **evaluation})
                if cfg.eval.stop_at_accuracy is not None and evaluation["eval_accuracy"] >= cfg.eval.stop_at_accuracy:
                    if is_main_rank():
                        print(f"eval accuracy {evaluation['eval_accuracy']:.3f} >= eval.stop_at_accuracy "
                              f"{cfg.eval.stop_at_accuracy}: stopping at step {self.state.step}")
                    break
            else:
                last_evaluation = None
            if cfg.checkpoint.dir and crossed(cfg.checkpoint.interval) and self.state.step < cfg.training.steps:
                self._checkpoint(wait=False)
                last_checkpoint = self.state.step
            signum = stop.agreed()  # a safe point: the trainer state plus the sampler is the whole loop state
            if signum is not None:
                self._stop_for_signal(signum, last_checkpoint)
        if cfg.eval.prompts:
            # The weights a periodic eval of the last step measured have not changed since.
            final = last_evaluation or self._evaluate()
            if history:
                history[-1].update({f"final_{k}": v for k, v in final.items()})
            if is_main_rank():
                self.logger.log({"step": self.state.step, **{f"final_{k}": v for k, v in final.items()}})
        if cfg.checkpoint.dir and last_checkpoint != self.state.step:
            self._checkpoint()
        self._finish_checkpoints(wait=True)
        if self.handoff is not None:
            self.handoff.for_training()  # the trainer's state whole again for whoever holds it next
        return history

    @in_phase("rollout (waiting for every engine's samples)", "rollout.wait_timeout_minutes")
    def _rollout_batch(self):
        from rift_megatron.rollout.loader import RolloutDataLoader

        if not hasattr(self, "_loader"):
            self._loader = RolloutDataLoader(
                self.records, self.prompt_ids, self.sampler, self.engine, self.pool, k=self.cfg.rollout.k,
                sampling=to_sampling_config(self.cfg), pad_id=self.pad_id,
                engine_tensor_parallel=self.cfg.rollout.engine_tensor_parallel,
            )
        batch = self._loader.next_batch(self.rollout_step, self.dp_rank, self.dp_size)
        self.rollout_step += 1
        return batch

    def _buffer_sample(self, index: int) -> Sample:
        row = self.buffer[index]
        return Sample(row.prompt_ids, row.response_ids, row.behavior_logprobs, row.reward)

    def close(self) -> None:
        self.checkpoints.abandon()  # after a failure only: a normal end has waited for every write
        self.logger.close()
        if self.pool is not None:
            self.pool.close()
        destroy_model_parallel()
