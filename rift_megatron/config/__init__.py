"""The typed config of a training run: YAML plus dotted overrides, validated at the boundary.

    cfg = load_config("cfg.yaml", ["training.steps=10", "algorithm.ratio_cap=null"])
    dp = validate_for_world(cfg, world_size)      # parallel sizes, batch sizes, paths
    print(dump_yaml(cfg))                          # the resolved config (also saved with checkpoints)
    layout = to_parallel_layout(cfg)               # runtime objects of the existing modules

Layout: ``schema.py`` (the dataclass sections, documented field by field), ``loading.py``
(YAML / overrides / typed construction / dump), ``checks.py`` (ranges, cross-field rules,
:func:`validate_for_world`), ``runtime.py`` (``to_*`` builders, importing torch lazily).
Importing this package never imports torch or megatron.
"""

from .checks import check_config, validate_for_world
from .loading import config_from_dict, config_to_dict, dump_yaml, load_config, save_config
from .runtime import (
    model_folder,
    sync_check_tolerance,
    to_engine_config,
    to_eval_sampling_config,
    to_loss_settings,
    to_offload_parts,
    to_checkpoint_writer,
    to_optim_config,
    to_parallel_layout,
    to_precision_config,
    to_reward_spec,
    to_sampling_config,
)
from .schema import (
    AlgorithmConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimSection,
    ParallelConfig,
    RiftConfig,
    RolloutConfig,
    TrainingConfig,
)

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimSection",
    "ParallelConfig",
    "RiftConfig",
    "RolloutConfig",
    "TrainingConfig",
    "check_config",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "model_folder",
    "save_config",
    "sync_check_tolerance",
    "to_engine_config",
    "to_eval_sampling_config",
    "to_loss_settings",
    "to_offload_parts",
    "to_checkpoint_writer",
    "to_optim_config",
    "to_parallel_layout",
    "to_precision_config",
    "to_reward_spec",
    "to_sampling_config",
    "validate_for_world",
]
