"""Typed configuration: `schema` (the run config's dataclass tree), `choices` (every choice set as a Literal),
`loader` (YAML, dotted overrides, validation), `sweep` (the sweep spec). Standard library + PyYAML only (no torch).

    from hpc_drseg.config import load_config, RunConfig
"""

from hpc_drseg.config.checks import ConfigError
from hpc_drseg.config.loader import (
    config_from_dict,
    config_to_dict,
    describe_fields,
    dump_config,
    load_config,
    parse_overrides,
    save_config,
)
from hpc_drseg.config.schema import (
    AugmentConfig,
    CBAMConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    LossWeights,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    input_multiple,
)
from hpc_drseg.config.sweep import (
    SweepConfig,
    SweepEvalConfig,
    SweepExecutorConfig,
    SweepParam,
    SweepRandomConfig,
    load_sweep_config,
)

__all__ = [
    "AugmentConfig",
    "CBAMConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "LossWeights",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SweepConfig",
    "SweepEvalConfig",
    "SweepExecutorConfig",
    "SweepParam",
    "SweepRandomConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "dump_config",
    "input_multiple",
    "load_config",
    "load_sweep_config",
    "parse_overrides",
    "save_config",
]
