"""The run config: defaults, YAML + override precedence, one-line errors naming the key (and the
file / line or the override it came from), checks against the world size and the file system,
the dump / load round trip, the example config, and the runtime objects built from it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rift_megatron.config import (
    AlgorithmConfig,
    ConfigError,
    RiftConfig,
    TrainingConfig,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    save_config,
    sync_check_tolerance,
    to_engine_config,
    to_eval_sampling_config,
    to_loss_settings,
    to_optim_config,
    to_parallel_layout,
    to_precision_config,
    to_reward_spec,
    to_sampling_config,
    validate_for_world,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny_cpu" / "config.yaml"


def length_reward(prompt: str, response: str, answer: str) -> bool:
    """A user reward function, referenced as 'tests.unit.test_config:length_reward'."""
    return len(response) > 0


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(*args) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args)
    message = str(info.value)
    assert "\n" not in message, message  # one line per problem
    return message


# ---------------------------------------------------------------------------------------- loading


def test_defaults_load_without_a_file():
    cfg = load_config(None)
    assert cfg == RiftConfig()
    assert cfg.algorithm == AlgorithmConfig(name="rift", ratio_cap=None, granularity="token",
                                            normalization="global", r_pos=1.0, r_neg=-0.2, reward="math")
    assert cfg.parallel.tensor == 1 and cfg.data.mode == "online" and cfg.model.dtype == "fp32"


def test_importing_the_config_does_not_import_torch():
    code = "import sys, rift_megatron.config; assert 'torch' not in sys.modules and 'megatron' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


def test_overrides_take_precedence_over_the_file_and_later_overrides_win(tmp_path):
    path = write(tmp_path, """
training:
  steps: 5
  seed: 7
optim:
  lr: 1e-4
algorithm:
  ratio_cap: 2.0
""")
    cfg = load_config(path, [
        "training.steps=10", "training.steps=11", "algorithm.ratio_cap=null",
        "parallel.tensor=2", "parallel.sequence_parallel=true", "logging.dir=runs/x",
        "rollout.stop=[\"\\n\\n\", '</s>']", "optim.lr_decay_style=cosine",
    ])
    assert cfg.training == TrainingConfig(steps=11, seed=7)  # file's seed kept, defaults for the rest
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.algorithm.ratio_cap is None
    assert cfg.parallel.sequence_parallel is True and cfg.parallel.tensor == 2
    assert cfg.logging.dir == "runs/x"
    assert cfg.rollout.stop == ("\n\n", "</s>")
    assert cfg.optim.lr_decay_style == "cosine"


def test_a_mapping_override_merges_into_the_section(tmp_path):
    path = write(tmp_path, "training:\n  steps: 5\n  seed: 7\n")
    cfg = load_config(path, ["training={steps: 6, micro_batch_size: 2}"])
    assert (cfg.training.steps, cfg.training.seed, cfg.training.micro_batch_size) == (6, 7, 2)


def test_yaml_scalars_follow_yaml_1_2(tmp_path):
    path = write(tmp_path, """
optim:
  lr: 1e-5           # a number, not the string PyYAML's YAML 1.1 rules give
  min_lr: 0
checkpoint:
  resume: no         # a path named 'no', not false
logging:
  wandb_run_name: 2026-01-01
""")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-5 and cfg.optim.min_lr == 0.0 and isinstance(cfg.optim.min_lr, float)
    assert cfg.checkpoint.resume == "no"
    assert cfg.logging.wandb_run_name == "2026-01-01"


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RiftConfig()
    assert load_config(write(tmp_path, "training:\n  # steps: 3\n", "b.yaml")) == RiftConfig()


# ----------------------------------------------------------------------------------------- errors


def test_unknown_top_level_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "model:\n  dtype: fp32\ntrainig:\n  steps: 3\n")
    assert error_of(path) == f"unknown config key 'trainig' (in {path}, line 3); did you mean 'training'?"


def test_unknown_nested_key_names_full_path_and_suggestion(tmp_path):
    path = write(tmp_path, "training:\n  stpes: 10\n")
    assert error_of(path) == f"unknown config key 'training.stpes' (in {path}, line 2); did you mean 'training.steps'?"


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("training.seeds=3", "training.seed"),
        ("training.lr=1e-3", "optim.lr"),  # right name, wrong section
        ("steps=3", "training.steps"),
        ("algorithm.ratio=2", "algorithm.ratio_cap"),
        ("optimizer.lr=1", "optim"),  # unknown section
        ("rollout.K=3", "rollout.k"),  # case
        ("rollout.temp=1", "rollout.temperature"),  # unique prefix
        ("parallel.tp=2", "parallel.tensor"),  # Megatron-LM's short name
    ],
)
def test_unknown_key_in_override_suggests_closest_valid_key(override, suggestion):
    key = override.partition("=")[0]
    key = key if suggestion.count(".") == key.count(".") else key.partition(".")[0]  # first unknown part
    assert error_of(None, [override]) == (
        f"unknown config key {key!r} (in override {override!r}); did you mean {suggestion!r}?"
    )


def test_unknown_key_without_a_close_match_has_no_suggestion():
    assert error_of(None, ["training.zzzzqqq=1"]) == "unknown config key 'training.zzzzqqq' (in override 'training.zzzzqqq=1')"


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    assert error_of(None, ["training.steps=ten"]) == (
        "config key 'training.steps' (in override 'training.steps=ten') must be an integer, got 'ten' (str)"
    )
    path = write(tmp_path, "optim:\n  lr: fast\n")
    assert error_of(path) == f"config key 'optim.lr' (in {path}, line 2) must be a number, got 'fast' (str)"
    assert "must be a string or null, got 5 (int)" in error_of(None, ["model.hf_dir=5"])
    assert "must be a boolean (true or false), got 'yes' (str)" in error_of(None, ["logging.wandb=yes"])
    assert "must be a list of strings, got 'x' (str)" in error_of(None, ["rollout.stop=x"])


def test_bool_is_never_an_integer_or_a_number():
    assert error_of(None, ["training.steps=true"]) == (
        "config key 'training.steps' (in override 'training.steps=true') must be an integer, got true (bool)"
    )
    assert "must be a number, got false (bool)" in error_of(None, ["optim.lr=false"])


def test_integer_is_accepted_for_a_float_but_a_float_not_for_an_integer():
    assert load_config(None, ["optim.clip_grad=2"]).optim.clip_grad == 2.0
    assert "must be an integer, got 2.5 (float)" in error_of(None, ["training.steps=2.5"])


def test_null_only_for_optional_keys():
    assert error_of(None, ["training.steps=null"]) == (
        "config key 'training.steps' (in override 'training.steps=null') must be an integer, got null"
    )
    assert "config key 'logging.dir'" in error_of(None, ["logging.dir="])  # `key=` is null
    assert load_config(None, ["checkpoint.keep_last=null"]).checkpoint.keep_last is None


def test_enum_value_not_allowed_lists_the_choices():
    assert error_of(None, ["algorithm.name=grpo"]) == (
        "config key 'algorithm.name' (in override 'algorithm.name=grpo') must be one of "
        "'rift', 'rft', 'sft', 'naive', got 'grpo' (str)"
    )
    assert error_of(None, ["algorithm.normalization=per-sign"]).endswith(
        "must be one of 'global', 'per_sign', got 'per-sign' (str); did you mean 'per_sign'?"
    )


@pytest.mark.parametrize("override", ["training.steps", "=10", "training..steps=1", "training.steps 10", ""])
def test_malformed_override_is_named(override):
    assert error_of(None, [override]) == (
        f"malformed override {override!r}: expected key.sub=value, e.g. training.steps=10"
    )


def test_override_value_that_is_not_yaml_is_named():
    assert error_of(None, ["data.prompts=[oops"]).startswith(
        "malformed override 'data.prompts=[oops': the value is not valid YAML ("
    )


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "training:\n  steps: 10\n  seed: [1, 2\noptim:\n  lr: 1\n")
    message = error_of(path)
    assert message.startswith(f"invalid YAML in {path}, line ")
    path = write(tmp_path, "training:\n  steps: 10\n    seed: 3\n", "b.yaml")
    assert error_of(path).startswith(f"invalid YAML in {path}, line 3, column ")


def test_section_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "model:\n  dtype: fp32\ntraining: 100\n")
    assert error_of(path) == (
        f"config section 'training' (in {path}, line 3) must be a mapping of keys, got 100 (int)"
    )
    path = write(tmp_path, "- model\n- training\n", "list.yaml")
    assert error_of(path) == (
        f"config file {path} must contain a mapping of sections (model:, training:, ...), "
        "got ['model', 'training'] (list)"
    )


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "training:\n  steps: 1\n  seed: 2\n  steps: 3\n")
    assert error_of(path) == f"duplicate config key 'training.steps' in {path} (lines 2 and 4)"


def test_missing_config_file():
    assert error_of("/nonexistent/cfg.yaml") == "config file '/nonexistent/cfg.yaml' does not exist"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tensor=0"], "config key 'parallel.tensor' (in override 'parallel.tensor=0') must be >= 1, got 0"),
        (["rollout.top_p=1.5"], "config key 'rollout.top_p' (in override 'rollout.top_p=1.5') must be <= 1, got 1.5"),
        (["algorithm.ratio_cap=0"], "must be > 0, got 0"),
        (["rollout.cpu_kv_cache_gib=0"], "must be > 0, got 0"),
        (["optim.lr=.inf"], "config key 'optim.lr' (in override 'optim.lr=.inf') must be a finite number, got inf"),
        (["data.prompt_field=''"], "config key 'data.prompt_field' (in override \"data.prompt_field=''\") must not be empty"),
        (["parallel.sequence_parallel=true"],
         "config key 'parallel.sequence_parallel' (in override 'parallel.sequence_parallel=true') "
         "needs parallel.tensor >= 2, got parallel.tensor = 1"),
        (["parallel.virtual_pipeline=2"], "needs parallel.pipeline >= 2, got parallel.pipeline = 1"),
        (["optim.lr=1e-5", "optim.min_lr=1e-4"], "config key 'optim.min_lr' (in override 'optim.min_lr=1e-4') "
         "must be <= optim.lr (1e-05), got 0.0001"),
        (["optim.lr_warmup_steps=10", "optim.lr_decay_steps=5"], "must be < optim.lr_decay_steps (5), got 10"),
        (["algorithm.reward=mth"], "must be 'math', 'exact' or a function path 'pkg.module:name', got 'mth'; "
         "did you mean 'math'?"),
        (["data.answer_field=prompt"], "must differ from data.prompt_field, both are 'prompt'"),
        (["rollout.top_k=0"], "must be -1 (off) or >= 1, got 0"),
        (["training.max_tokens_per_micro_batch=0"], "config key 'training.max_tokens_per_micro_batch' (in override "
         "'training.max_tokens_per_micro_batch=0') must be >= 1, got 0"),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "training.max_tokens_per_micro_batch=4096"],
         "does not work with parallel.virtual_pipeline"),
        (["checkpoint.interval=5"], "is 5 but checkpoint.dir is null"),
        (["eval.interval=5"], "is 5 but eval.prompts is null"),
        (["eval.k=4"], "is 4 but eval.temperature is 0 (greedy)"),
        (["eval.stop_at_accuracy=0.5"], "config key 'eval.stop_at_accuracy' (in override 'eval.stop_at_accuracy=0.5') "
         "needs periodic evaluations: set eval.interval > 0"),
        (["eval.stop_at_accuracy=1.5"], "must be <= 1, got 1.5"),
        (["parallel.overlap_param_gather=true", "optim.use_distributed_optimizer=false"],
         "config key 'parallel.overlap_param_gather' (in override 'parallel.overlap_param_gather=true') "
         "needs optim.use_distributed_optimizer: true"),
        (["parallel.overlap_param_gather=true", "parallel.overlap_grad_reduce=false"],
         "needs parallel.overlap_grad_reduce (true or null)"),
        (["training.recompute=partial"], "training.recompute"),
    ],
)
def test_values_out_of_range_or_inconsistent_are_named(overrides, message):
    assert message in error_of(None, overrides)


def test_value_errors_from_a_file_name_its_line(tmp_path):
    path = write(tmp_path, "training:\n  steps: 3\nparallel:\n  tensor: 0\n")
    assert error_of(path) == f"config key 'parallel.tensor' (in {path}, line 4) must be >= 1, got 0"


def test_config_from_dict_checks_like_load_config():
    assert config_from_dict({"training": {"steps": 3}}).training.steps == 3
    with pytest.raises(ConfigError, match="unknown config key 'training.stepz'; did you mean 'training.steps'"):
        config_from_dict({"training": {"stepz": 3}})
    with pytest.raises(ConfigError, match="a config must be a mapping of sections"):
        config_from_dict([1, 2])


# ---------------------------------------------------------------------------- world / file system


def stand_in_model(folder: Path, weights: bool = True) -> Path:
    """A model folder the checks accept: a valid config.json (4096 positions, so any response
    length fits), a tokenizer file (by name: validate_for_world does not load it) and a weights
    file whose safetensors header is sound (it is checked: a cut download is refused)."""
    import torch
    from safetensors.torch import save_file

    from rift_megatron.models.presets import tiny_hf_config

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(tiny_hf_config(max_position_embeddings=4096)))
    (folder / "tokenizer.json").write_text("{}")
    if weights:
        save_file({"stand_in": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def ready(tmp_path):
    """A config whose model folder and prompt file exist."""
    hf = stand_in_model(tmp_path / "hf")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    return load_config(None, [f"model.hf_dir={hf}", f"data.prompts={prompts}"])


def world_error(cfg, world_size: int) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_for_world(cfg, world_size)
    return str(info.value).splitlines()


def test_valid_config_returns_the_data_parallel_size(ready):
    assert validate_for_world(ready, 1) == 1
    cfg = dataclasses.replace(ready, parallel=dataclasses.replace(ready.parallel, tensor=2))
    assert validate_for_world(cfg, 4) == 2


def test_full_recompute_groups_must_fit_in_one_model_chunk(ready):
    """The tiny model has 4 layers: 2 per stage at PP2, 1 per virtual chunk at PP2 x VPP2."""
    full = dataclasses.replace(ready.training, recompute="full", recompute_num_layers=2)
    assert validate_for_world(dataclasses.replace(ready, training=full), 1) == 1
    pp2 = dataclasses.replace(ready, training=full, parallel=dataclasses.replace(ready.parallel, pipeline=2,
                                                                                   virtual_pipeline=2))
    assert world_error(pp2, 2) == [
        "training.recompute_num_layers (2) is more than the 1 layers of one model chunk (4 layers / 4 pipeline chunks)"
    ]


def test_tp_times_pp_must_divide_the_world_size(ready):
    cfg = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2", f"model.hf_dir={ready.model.hf_dir}",
                             f"data.prompts={ready.data.prompts}", "data.prompts_per_step=6",
                             "training.global_batch_size=48"])
    assert world_error(cfg, 6) == [
        "parallel.tensor (2) x parallel.pipeline (2) x parallel.context (1) = 4 does not divide the world size 6"
    ]


def test_context_parallelism_counts_in_the_world_and_is_refused_without_transformer_engine(ready):
    """world = TP x PP x CP x DP; on this machine (no CUDA, so local layers) CP > 1 cannot run:
    one line naming the key and saying what it needs, next to the size problem."""
    cp2 = dataclasses.replace(ready, parallel=dataclasses.replace(ready.parallel, context=2))
    assert to_parallel_layout(cp2).context == 2
    refusal = ("parallel.context is 2 but context parallelism needs Transformer Engine attention (model.layer_impl "
               "resolving to 'transformer_engine' on a CUDA GPU; here: local): Megatron-Core's local attention "
               "refuses context_parallel_size > 1")
    assert world_error(cp2, 2) == [refusal]
    lines = world_error(cp2, 3)
    assert lines[0] == (
        "parallel.tensor (1) x parallel.pipeline (1) x parallel.context (2) = 2 does not divide the world size 3"
    )
    assert lines[-1] == refusal
    assert error_of(None, ["parallel.context=0"]).startswith("config key 'parallel.context'")


def test_global_batch_must_split_into_micro_batches_times_dp(ready):
    cfg = dataclasses.replace(ready, training=dataclasses.replace(ready.training, global_batch_size=32, micro_batch_size=3))
    assert world_error(cfg, 1) == [
        "training.global_batch_size (32) is not divisible by training.micro_batch_size (3) x data-parallel size (1) = 3"
    ]


def test_packed_micro_batches_need_only_the_global_batch_to_split_over_dp(ready):
    """With training.max_tokens_per_micro_batch the micro-batches are cut by tokens, so
    micro_batch_size does not have to divide anything; the data-parallel split still must."""
    packed = dataclasses.replace(ready.training, global_batch_size=30, micro_batch_size=4, max_tokens_per_micro_batch=512)
    cfg = dataclasses.replace(ready, training=packed, data=dataclasses.replace(ready.data, prompts_per_step=15),
                              rollout=dataclasses.replace(ready.rollout, k=2))
    assert validate_for_world(cfg, 1) == 1
    four_ranks = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pipeline=4))
    assert "training.global_batch_size (30) is not divisible by the data-parallel size (4)" in world_error(four_ranks, 16)


def test_rollout_batch_must_split_over_dp_engines_and_global_batches(ready):
    cfg = dataclasses.replace(ready, data=dataclasses.replace(ready.data, prompts_per_step=3),
                              rollout=dataclasses.replace(ready.rollout, k=3, engine_tensor_parallel=2),
                              training=dataclasses.replace(ready.training, global_batch_size=2, micro_batch_size=1))
    assert world_error(cfg, 2) == [
        "data.prompts_per_step (3) x rollout.k (3) = 9 is not divisible by the data-parallel size 2"
    ]
    assert world_error(cfg, 1) == [
        "rollout.engine_tensor_parallel (2) does not divide the world size 1",
        "data.prompts_per_step (3) x rollout.k (3) = 9 samples per rollout is not divisible by "
        "training.global_batch_size (2)",
    ]
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, k=4, engine_tensor_parallel=1))
    assert world_error(cfg, 2) == [
        "data.prompts_per_step (3) is not divisible by the number of rollout engines 2 "
        "(world size 2 / rollout.engine_tensor_parallel 1)"
    ]


def test_model_dir_must_exist_and_hold_config_json(ready, tmp_path):
    missing = tmp_path / "nope"
    cfg = dataclasses.replace(ready, model=dataclasses.replace(ready.model, hf_dir=str(missing)))
    assert world_error(cfg, 1) == [f"model.hf_dir '{missing}' does not exist (a local Hugging Face model folder "
                                   "is expected)"]
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = dataclasses.replace(ready, model=dataclasses.replace(ready.model, hf_dir=str(empty)))
    assert world_error(cfg, 1) == [f"model.hf_dir '{empty}' has no config.json (not a Hugging Face model folder)"]
    cfg = dataclasses.replace(ready, model=dataclasses.replace(ready.model, hf_dir=None))
    assert world_error(cfg, 1)[0].startswith("model.hf_dir and model.mcore_ckpt are both null")
    cfg = dataclasses.replace(ready, model=dataclasses.replace(ready.model, mcore_ckpt=str(missing)))
    assert world_error(cfg, 1) == [f"model.mcore_ckpt '{missing}' does not exist"]


def test_a_megatron_checkpoint_with_hf_assets_can_be_the_only_model_source(ready, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    not_a_checkpoint = dataclasses.replace(ready, model=dataclasses.replace(ready.model, mcore_ckpt=str(checkpoint)))
    [problem] = world_error(not_a_checkpoint, 1)
    assert problem.startswith("model.mcore_ckpt: ") and "not a Megatron checkpoint" in problem
    (checkpoint / "metadata.json").write_text("{}")
    mcore_only = dataclasses.replace(ready, model=dataclasses.replace(ready.model, hf_dir=None,
                                                                      mcore_ckpt=str(checkpoint)))
    [problem] = world_error(mcore_only, 1)
    assert problem.startswith("model.mcore_ckpt: ") and "hf_assets" in problem and problem.endswith("(or set model.hf_dir)")
    stand_in_model(checkpoint / "hf_assets", weights=False)
    assert validate_for_world(mcore_only, 1) == 1
    # a run directory whose `latest` names the checkpoint works too
    (tmp_path / "latest").write_text("ckpt\n")
    run_dir = dataclasses.replace(mcore_only, model=dataclasses.replace(mcore_only.model, mcore_ckpt=str(tmp_path)))
    assert validate_for_world(run_dir, 1) == 1


def test_data_paths_must_exist_for_the_chosen_mode(ready, tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    cfg = dataclasses.replace(ready, data=dataclasses.replace(ready.data, prompts=missing))
    assert world_error(cfg, 1) == [f"data.prompts '{missing}' does not exist"]
    cfg = dataclasses.replace(ready, data=dataclasses.replace(ready.data, prompts=None))
    assert world_error(cfg, 1)[0].startswith("data.prompts is not set")

    offline = dataclasses.replace(ready.data, mode="offline", prompts=None)
    assert world_error(dataclasses.replace(ready, data=offline), 1)[0].startswith("data.buffer is not set")
    buffer = tmp_path / "buf"
    buffer.mkdir()
    cfg = dataclasses.replace(ready, data=dataclasses.replace(offline, buffer=str(buffer)))
    assert world_error(cfg, 1) == [f"data.buffer '{buffer}' has no rollout.parquet (write one with `rift rollout`)"]
    (buffer / "rollout.parquet").write_bytes(b"")
    assert validate_for_world(cfg, 1) == 1
    # the rollout-batch rules do not apply offline (prompts_per_step x k is irrelevant there)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prompts_per_step=3))
    assert validate_for_world(cfg, 2) == 2


def test_eval_and_resume_paths_must_exist(ready, tmp_path):
    missing = str(tmp_path / "x")
    cfg = dataclasses.replace(ready, eval=dataclasses.replace(ready.eval, prompts=missing),
                              checkpoint=dataclasses.replace(ready.checkpoint, resume=missing))
    assert world_error(cfg, 1) == [
        f"eval.prompts '{missing}' does not exist",
        f"checkpoint.resume '{missing}' does not exist (use 'auto', 'none' or an existing checkpoint)",
    ]


def test_every_problem_is_reported_on_its_own_line():
    lines = world_error(load_config(None, ["parallel.tensor=4"]), 6)
    assert lines[0] == (
        "parallel.tensor (4) x parallel.pipeline (1) x parallel.context (1) = 4 does not divide the world size 6"
    )
    assert "model.hf_dir and model.mcore_ckpt are both null" in lines[-2] and "data.prompts is not set" in lines[-1]


@pytest.mark.parametrize("world_size", [0, -1, True, 2.0])
def test_world_size_must_be_a_positive_integer(ready, world_size):
    with pytest.raises(ConfigError, match="world size must be a positive integer"):
        validate_for_world(ready, world_size)


# ------------------------------------------------------------------------------------ round trip


def test_dump_then_load_gives_an_equal_config(tmp_path):
    cfg = load_config(None, [
        "model.hf_dir=models/x", "parallel.tensor=2", "parallel.sequence_parallel=true",
        "optim.lr=3e-7", "optim.lr_decay_steps=50", "algorithm.ratio_cap=5", "algorithm.reward=my.pkg:score",
        "rollout.stop=[\"\\n\\n\", '1e5', 'yes', 'null']", "checkpoint.resume=none",
        "logging.wandb_run_name='1e5'", "data.prompt_field='true'", "training.seed=0",
    ])
    assert cfg.logging.wandb_run_name == "1e5" and cfg.data.prompt_field == "true"
    text = dump_yaml(cfg)
    assert load_config(write(tmp_path, text)) == cfg
    assert load_config(write(tmp_path, dump_yaml(cfg, comments=True), "commented.yaml")) == cfg
    saved = save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(saved) == cfg


def test_config_to_dict_is_plain_nested_data():
    data = config_to_dict(load_config(None, ["rollout.stop=[a]"]))
    assert list(data) == ["model", "parallel", "optim", "algorithm", "data", "rollout", "training",
                          "checkpoint", "eval", "logging"]
    assert data["rollout"]["stop"] == ["a"] and data["training"]["steps"] == 100
    assert config_from_dict(data) == load_config(None, ["rollout.stop=[a]"])


def test_commented_dump_documents_every_key():
    text = dump_yaml(RiftConfig(), comments=True)
    for path in ("training:", "  steps: 100", "  # Optimizer steps in total", "  ratio_cap: null"):
        assert path in text


# ------------------------------------------------------------------------------- example config


def test_tiny_cpu_example_loads_and_fits_1_2_and_4_processes(tmp_path, monkeypatch):
    cfg = load_config(EXAMPLE)
    assert cfg.model.hf_dir == "demo_out/models/warmup" and cfg.data.mode == "online"
    monkeypatch.chdir(tmp_path)  # the example's relative paths, created here
    stand_in_model(Path(cfg.model.hf_dir))
    for path in (cfg.data.prompts, cfg.eval.prompts):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("")
    assert [validate_for_world(cfg, n) for n in (1, 2, 4)] == [1, 2, 4]


# ----------------------------------------------------------------------------- runtime objects


@pytest.fixture
def runtime_cfg():
    pytest.importorskip("torch")
    return load_config(None, [
        "model.hf_dir=models/x", "model.dtype=bf16",
        "parallel.tensor=2", "parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.sequence_parallel=true",
        "optim.lr=2e-6", "optim.min_lr=1e-7", "optim.weight_decay=0.1", "optim.adam_beta2=0.95",
        "optim.adam_eps=1e-6", "optim.clip_grad=0.5", "optim.lr_warmup_steps=3", "optim.lr_decay_steps=40",
        "optim.lr_decay_style=cosine", "optim.use_distributed_optimizer=false",
        "algorithm.name=rift", "algorithm.ratio_cap=4", "algorithm.granularity=sequence",
        "algorithm.normalization=per_sign", "algorithm.r_pos=2", "algorithm.r_neg=-1",
        "algorithm.reward=exact", "algorithm.reward_timeout_s=3", "algorithm.reward_workers=4",
        "algorithm.reward_memory_limit_mb=null",
        "rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.top_k=20", "rollout.max_tokens=64",
        "rollout.stop=[END]", "rollout.engine_tensor_parallel=2", "rollout.engine_dtype=bfloat16",
        "rollout.gpu_memory_utilization=0.4", "rollout.cpu_kv_cache_gib=0.25", "rollout.enable_sleep_mode=false",
        "training.seed=9", "eval.temperature=0.5", "eval.max_tokens=32",
    ])


def test_runtime_objects_equal_hand_built_ones(runtime_cfg):
    from rift_megatron.loss.megatron_loss import LossSettings
    from rift_megatron.models.provider import PrecisionConfig
    from rift_megatron.parallel import ParallelLayout
    from rift_megatron.rollout.engine import EngineConfig, SamplingConfig
    from rift_megatron.rollout.rewards import RewardSpec
    from rift_megatron.training.setup import OptimConfig

    cfg = runtime_cfg
    assert to_parallel_layout(cfg) == ParallelLayout(tensor=2, pipeline=2, virtual_pipeline=2, sequence_parallel=True)
    assert to_optim_config(cfg) == OptimConfig(
        lr=2e-6, min_lr=1e-7, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-6, clip_grad=0.5,
        lr_warmup_steps=3, lr_decay_steps=40, lr_decay_style="cosine", use_distributed_optimizer=False,
    )
    assert to_precision_config(cfg) == PrecisionConfig(dtype="bf16")
    assert to_loss_settings(cfg) == LossSettings(
        algorithm="rift", ratio_cap=4.0, granularity="sequence", normalization="per_sign"
    )
    assert to_reward_spec(cfg) == RewardSpec(
        kind="exact", function=None, r_pos=2.0, r_neg=-1.0, timeout_s=3.0, workers=4, memory_limit_mb=None
    )
    assert to_sampling_config(cfg) == SamplingConfig(
        temperature=0.7, top_p=0.9, top_k=20, max_tokens=64, stop=("END",)
    )
    assert to_eval_sampling_config(cfg) == SamplingConfig(temperature=0.5, max_tokens=32, stop=("END",))
    assert to_engine_config(cfg, max_model_len=300) == EngineConfig(
        model="models/x", dtype="bfloat16", max_model_len=300, tensor_parallel_size=2,
        gpu_memory_utilization=0.4, cpu_kv_cache_gib=0.25, enable_sleep_mode=False, seed=9,
    )


def test_a_choice_of_a_word_or_a_boolean_takes_exactly_those():
    from rift_megatron.config import load_config

    assert [load_config(None, [f"checkpoint.async_save={value}"]).checkpoint.async_save
            for value in ("auto", "true", "false")] == ["auto", True, False]
    assert error_of(None, ["checkpoint.async_save=1"]) == (
        "config key 'checkpoint.async_save' (in override 'checkpoint.async_save=1') must be one of "
        "'auto', true, false, got 1 (int)")
    assert error_of(None, ["checkpoint.async_save=autp"]).endswith("got 'autp' (str); did you mean 'auto'?")


def test_async_checkpoint_save_auto_is_on_with_cuda_only(monkeypatch):
    pytest.importorskip("torch")
    import rift_megatron.platform
    from rift_megatron.config import load_config, to_checkpoint_writer
    from rift_megatron.platform.device import Platform

    monkeypatch.setattr(rift_megatron.platform, "current_platform", lambda: Platform(kind="cpu", backend="gloo"))
    writer = to_checkpoint_writer(load_config(None, ["checkpoint.fully_parallel_save=false"]))
    assert (writer.asynchronous, writer.fully_parallel) == (False, False)
    assert to_checkpoint_writer(load_config(None, ["checkpoint.async_save=true"])).asynchronous is True
    monkeypatch.setattr(rift_megatron.platform, "current_platform", lambda: Platform(kind="cuda", backend="nccl"))
    assert to_checkpoint_writer(RiftConfig()).asynchronous is True
    assert to_checkpoint_writer(load_config(None, ["checkpoint.async_save=false"])).asynchronous is False


def test_default_config_builds_every_runtime_object():
    pytest.importorskip("torch")
    from rift_megatron.loss.megatron_loss import LossSettings
    from rift_megatron.parallel import ParallelLayout
    from rift_megatron.rollout.rewards import RewardSpec
    from rift_megatron.training.setup import OptimConfig

    cfg = RiftConfig()
    assert to_parallel_layout(cfg) == ParallelLayout()
    assert to_optim_config(cfg) == OptimConfig()
    assert to_loss_settings(cfg) == LossSettings()
    assert to_reward_spec(cfg) == RewardSpec()  # the config's reward defaults are RewardSpec's


def test_reward_function_path_becomes_a_function_spec():
    pytest.importorskip("torch")
    from rift_megatron.rollout.rewards import RewardSpec

    cfg = load_config(None, ["algorithm.reward=tests.unit.test_config:length_reward"])
    assert to_reward_spec(cfg) == RewardSpec(kind="function", function="tests.unit.test_config:length_reward")


def test_engine_context_length_and_sync_tolerance(runtime_cfg):
    cfg = dataclasses.replace(runtime_cfg, rollout=dataclasses.replace(runtime_cfg.rollout, max_model_len=512))
    assert to_engine_config(cfg, max_model_len=300).max_model_len == 512  # the config wins
    with pytest.raises(ConfigError, match="rollout.max_model_len is null"):
        to_engine_config(runtime_cfg)
    assert sync_check_tolerance(runtime_cfg) == 0.1  # bf16 default
    assert sync_check_tolerance(RiftConfig()) == 2e-4  # fp32 trainer and (auto) fp32 engine
    # a coarser engine than the trainer: the bf16 tolerance
    assert sync_check_tolerance(load_config(None, ["rollout.engine_dtype=bfloat16"])) == 0.1
    assert sync_check_tolerance(load_config(None, ["rollout.sync_check_atol=0.02"])) == 0.02
    assert sync_check_tolerance(load_config(None, ["rollout.sync_check=false"])) is None


def test_engine_dtype_auto_is_the_trainers():
    """vLLM's own 'auto' follows the checkpoint (bf16 weights under an fp32 trainer: behaviour
    log-probs ~0.04 off); ours follows model.dtype."""
    from rift_megatron.config.runtime import engine_dtype

    assert engine_dtype(RiftConfig()) == "float32"
    assert engine_dtype(load_config(None, ["model.dtype=bf16"])) == "bfloat16"
    assert engine_dtype(load_config(None, ["model.dtype=fp16"])) == "float16"
    assert engine_dtype(load_config(None, ["model.dtype=bf16", "rollout.engine_dtype=float32"])) == "float32"
