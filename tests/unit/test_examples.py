"""The GPU examples: every examples/*/ folder but the CPU ones (a config.yaml, torchrun.sh, slurm.sh and
a README.md each).

One source of truth per example for its cluster and workload: the `rift plan ...` command quoted in its
config's header (--nodes x --gpus-per-node is its world). Checked for each example: the config
validates for that world and the model (its published config.json, models/presets.py) splits over its
layout; it is the planner's recommendation for that workload and the planner calls it feasible on
H100 80 GB; the figures its header quotes are the planner's for it (a change of the memory or step-time
model fails here until the header is updated); its launchers parse, and run against stand-ins for
srun / scontrol / torchrun that record what they were handed, they start the launch they describe.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from rift_megatron.config import load_config
from rift_megatron.config.checks import world_problems
from rift_megatron.config.schema import RiftConfig, RolloutConfig
from rift_megatron.memory_model import GIB
from rift_megatron.models.hf_config import ModelArchitecture, parse_hf_config
from rift_megatron.models.presets import LLAMA31_8B, QWEN25_72B
from rift_megatron.models.sharding import sharding_problem
from rift_megatron.planner.cli import register, request_from_args
from rift_megatron.planner.evaluate import LayoutPlan
from rift_megatron.planner.plan import Plan, make_plan
from rift_megatron.planner.predict import predict
from rift_megatron.planner.space import PlanRequest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CPU_EXAMPLES = {"tiny_cpu"}
GPU_EXAMPLES = sorted(path.parent.name for path in EXAMPLES.glob("*/config.yaml")
                      if path.parent.name not in CPU_EXAMPLES)
# The published config.json of each example's model, by the name of the folder its `rift plan --model` names.
PRESETS = {"Llama-3.1-8B-Instruct": LLAMA31_8B, "Qwen2.5-72B-Instruct": QWEN25_72B}
# The header's figure lines: `training 56.3 GiB (...`, `step 172 s = train 39.7 + TP comm 7.0 + ...`.
MEMORY_LINE = re.compile(r"^#\s+(training|push|rollout) (\d+\.\d) GiB\b", re.MULTILINE)
STEP_LINE = re.compile(r"^#\s+step (\d+) s = (.+)$", re.MULTILINE)
STEP_PARTS = {"train": "train", "TP comm": "tensor_comm", "DP comm": "data_comm", "prefill": "prefill",
              "decode": "decode", "push": "push", "offload": "offload"}
GIB_TOLERANCE, SECONDS_TOLERANCE = 0.1, 1.0


@dataclass(frozen=True)
class Example:
    name: str
    cfg: RiftConfig
    header: str
    request: PlanRequest  # what the header's `rift plan` command asks, with the model's published config
    arch: ModelArchitecture
    plan: Plan  # the planner's answer to that request
    predicted: LayoutPlan  # the planner's figures for the example's config itself

    @property
    def world(self) -> int:
        return self.request.world


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """name -> Example, each planned once per test session (a plan evaluates thousands of layouts)."""
    cache: dict[str, Example] = {}

    def get(name: str) -> Example:
        if name not in cache:
            cache[name] = _load(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _load(name: str, folder: Path) -> Example:
    path = EXAMPLES / name / "config.yaml"
    lines = path.read_text().splitlines()
    header = "\n".join(line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    commands = re.findall(r"^#\s+rift plan (.+)$", header, re.MULTILINE)
    assert len(commands) == 1, f"{name}: its header must quote one `rift plan ...` command, found {commands}"
    argv = shlex.split(commands[0])
    cfg = load_config(path)
    model = argv[argv.index("--model") + 1]
    assert model == cfg.model.hf_dir, f"{name}: rift plan --model {model} is not model.hf_dir {cfg.model.hf_dir}"
    (folder / "config.json").write_text(json.dumps(PRESETS[Path(model).name]))
    argv[argv.index("--model") + 1] = str(folder)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    request = request_from_args(parser.parse_args(["plan", *argv]))
    arch = parse_hf_config(PRESETS[Path(model).name])
    predicted = predict(cfg, arch, request.world, gpus_per_node=request.gpus_per_node,
                        gpu_memory_gib=request.gpu_memory_gib, headroom_gib=request.headroom_gib,
                        prompt_len=request.prompt_len, response_len=request.response_len)
    return Example(name, cfg, header, request, arch, make_plan(request), predicted)


def test_every_gpu_example_has_its_files():
    assert len(GPU_EXAMPLES) >= 2, GPU_EXAMPLES
    for name in GPU_EXAMPLES:
        for file in ("config.yaml", "torchrun.sh", "slurm.sh", "README.md"):
            assert (EXAMPLES / name / file).is_file(), (name, file)


@pytest.mark.parametrize("name", GPU_EXAMPLES)
def test_config_validates_for_its_world_and_splits_its_model(name, examples):
    example = examples(name)
    cfg, world = example.cfg, example.world
    assert list(world_problems(cfg, world)) == []
    assert list(world_problems(cfg, world // 2 + 1))  # and the check can fail
    p = cfg.parallel
    assert sharding_problem(example.arch, p.tensor, p.pipeline, p.virtual_pipeline) is None
    assert example.arch.num_attention_heads % cfg.rollout.engine_tensor_parallel == 0


@pytest.mark.parametrize("name", GPU_EXAMPLES)
def test_config_is_the_planners_feasible_recommendation(name, examples):
    """The workload is the one the quoted command plans, the layout (TP, PP, VPP, CP, DP, SP,
    micro-batch, recompute, engine TP, offload) and the engine budget are its recommendation, and the
    config's own settings (packing, push bucket) keep it feasible on H100 80 GB."""
    example = examples(name)
    cfg, request, predicted = example.cfg, example.request, example.predicted
    assert example.plan.feasible, example.plan.reason
    recommended = example.plan.recommended
    r, t = cfg.rollout, cfg.training
    # the workload the planner was asked about
    assert (r.k, cfg.data.prompts_per_step, r.max_model_len) == (request.k, request.prompts_per_step, request.seq_len)
    assert t.global_batch_size == request.prompts_per_step * request.k  # one optimizer step per rollout
    assert request.response_len <= r.max_tokens < request.seq_len
    assert (cfg.model.dtype, r.engine_dtype, cfg.optim.use_distributed_optimizer) == ("bf16", "bfloat16", True)
    # one offload answer for the three switches, and packing only where the planned memory holds
    assert len({switch is not False for switch in (r.param_offload, r.grad_offload, r.optimizer_offload)}) == 1
    if t.max_tokens_per_micro_batch is not None:
        assert cfg.parallel.virtual_pipeline is None
        assert t.max_tokens_per_micro_batch == t.micro_batch_size * request.seq_len
    # the recommendation, and feasible as configured
    assert predicted.layout == recommended.layout, (predicted.layout.name(), recommended.layout.name())
    assert r.gpu_memory_utilization == recommended.gpu_memory_utilization
    assert predicted.feasible, predicted.reason


@pytest.mark.parametrize("name", GPU_EXAMPLES)
def test_header_quotes_the_planners_figures(name, examples):
    """The header's training / push / rollout GiB and step seconds are predict()'s for the config,
    which are the recommendation's but for the push bucket: rift plan plans the default one."""
    example = examples(name)
    memory, step = example.predicted.memory, example.predicted.step
    quoted = {phase: float(value) for phase, value in MEMORY_LINE.findall(example.header)}
    assert sorted(quoted) == ["push", "rollout", "training"], example.header
    for phase, value in quoted.items():
        assert value == pytest.approx(getattr(memory, f"{phase}_total") / GIB, abs=GIB_TOLERANCE), (name, phase)
    (total, parts), = STEP_LINE.findall(example.header)
    assert float(total) == pytest.approx(step.total, abs=SECONDS_TOLERANCE), name
    named = dict(re.fullmatch(r"(.+) (\d+\.\d)", part.strip()).groups() for part in parts.split(" + "))
    assert sorted(named) == sorted(STEP_PARTS), parts
    for label, field in STEP_PARTS.items():
        assert float(named[label]) == pytest.approx(getattr(step, field), abs=SECONDS_TOLERANCE), (name, label)
    # and what `rift plan` prints for the recommendation
    planned = example.plan.recommended
    bucket = (example.cfg.rollout.sync_bucket_mb - RolloutConfig().sync_bucket_mb) * 2**20
    assert memory.training_total == planned.memory.training_total
    assert memory.rollout_total == planned.memory.rollout_total
    assert memory.push_total == planned.memory.push_total + bucket
    assert step.total == pytest.approx(planned.step.total)


def _sbatch_options(script: str) -> dict[str, str]:
    return dict(re.match(r"--([\w-]+)(?:=(\S+))?", line.removeprefix("#SBATCH ")).groups(default="")
                for line in script.splitlines() if line.startswith("#SBATCH "))


@pytest.mark.parametrize("name", GPU_EXAMPLES)
def test_launchers_parse_and_ask_slurm_for_the_planned_cluster(name, examples):
    request = examples(name).request
    folder = EXAMPLES / name
    for script in (folder / "torchrun.sh", folder / "slurm.sh", EXAMPLES / "launch_env.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        assert not re.search(r"^\s*(export\s+)?CUDA_DEVICE_MAX_CONNECTIONS=", text, re.MULTILINE), script  # the trainer's
        if script.name != "launch_env.sh":
            assert "\nset -euo pipefail\n" in text, script
    options = _sbatch_options((folder / "slurm.sh").read_text())
    assert options["nodes"] == str(request.nodes) and options["gpus-per-node"] == str(request.gpus_per_node)
    assert options["ntasks-per-node"] == "1" and int(options["cpus-per-task"]) >= 8 and "exclusive" in options


def _stand_ins(folder: Path) -> dict[str, str]:
    """srun (records its arguments, runs the command after its options, as on one node), scontrol
    (the job's host names) and torchrun (records its arguments, working directory and environment)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": 'printf "%s\\n" "$@" > "$RECORD/srun"\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',
        "scontrol": 'for i in $(seq 1 "$SLURM_NNODES"); do printf "node%03d\\n" "$i"; done\n',
        "torchrun": 'printf "%s\\n" "$@" > "$RECORD/torchrun"\npwd > "$RECORD/cwd"\nenv > "$RECORD/env"\n',
    }
    for command, body in scripts.items():
        (bin_dir / command).write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
        (bin_dir / command).chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(folder), "RECORD": str(folder)}


@pytest.mark.parametrize("name", GPU_EXAMPLES)
def test_slurm_script_starts_torchrun_on_every_node_with_the_documented_environment(name, examples, tmp_path):
    request = examples(name).request
    nodes, per_node = request.nodes, request.gpus_per_node
    env = {**_stand_ins(tmp_path), "SLURM_SUBMIT_DIR": str(REPO), "SLURM_NNODES": str(nodes),
           "SLURM_JOB_NODELIST": f"node[001-{nodes:03d}]", "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "96",
           "NCCL_IB_HCA": "mlx5_0,mlx5_3", "NCCL_SOCKET_IFNAME": ""}
    script = str(EXAMPLES / name / "slurm.sh")
    subprocess.run(["bash", script, "training.steps=3"], cwd=tmp_path, env=env, check=True, capture_output=True)
    srun = (tmp_path / "srun").read_text().split()
    assert f"--nodes={nodes}" in srun and "--cpus-per-task=96" in srun and "--ntasks-per-node=1" in srun
    torchrun = (tmp_path / "torchrun").read_text().split("\n")[:-1]
    assert torchrun[-5:] == ["-m", "rift_megatron.train", "--config", f"examples/{name}/config.yaml",
                             "training.steps=3"]
    assert " ".join(torchrun).count(f"--nproc-per-node {per_node}") == 1
    if nodes > 1:  # c10d rendezvous on the first node, the job's id
        assert " ".join(torchrun).startswith(f"--nnodes {nodes} --nproc-per-node {per_node} --rdzv-backend c10d "
                                             f"--rdzv-endpoint node001:29500 --rdzv-id 4242 ")
    else:
        assert "--standalone" in torchrun
    assert (tmp_path / "cwd").read_text().strip() == str(REPO)  # the config's relative paths start there
    seen = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert seen["NCCL_IB_HCA"] == "mlx5_0,mlx5_3"  # the caller's value kept
    assert seen["NCCL_DEBUG"] == "WARN" and seen["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "NCCL_SOCKET_IFNAME" not in seen and "CUDA_DEVICE_MAX_CONNECTIONS" not in seen  # empty: NCCL's choice

    # another world than the planned one is refused before torchrun starts
    (tmp_path / "torchrun").unlink()
    other = {"SLURM_NNODES": str(nodes // 2), "SLURM_JOB_NODELIST": "node[001-002]"} if nodes > 1 \
        else {"NPROC_PER_NODE": str(per_node // 2)}
    refused = subprocess.run(["bash", script], cwd=tmp_path, env={**env, **other}, capture_output=True, text=True)
    assert refused.returncode == 2 and "rift plan" in refused.stderr, refused.stderr
    assert not (tmp_path / "torchrun").exists()
