"""The one typed config of a run (schema.py), how it is loaded and overridden (load.py), and its checks
(validate.py). Everything a caller needs is importable from `dbot_ds.config`."""
from .load import (
                   PRESET_DIR,
                   _valid_keys,
                   build_config,
                   config_diff,
                   dump_config,
                   load_config,
                   parse_overrides,
                   preset_names,
                   zero_name,
)
from .schema import (
                   ARCHS,
                   Config,
                   ConfigError,
                   DataConfig,
                   DeepSpeedConfig,
                   EvalConfig,
                   ModelConfig,
                   ObjectiveConfig,
                   OptimConfig,
                   RunConfig,
                   ScheduleConfig,
                   TeacherConfig,
)
from .validate import grad_accum_steps, validate

__all__ = ["ARCHS", "PRESET_DIR", "Config", "ConfigError", "DataConfig", "DeepSpeedConfig", "EvalConfig",
           "ModelConfig", "ObjectiveConfig", "OptimConfig", "RunConfig", "ScheduleConfig", "TeacherConfig",
           "build_config", "config_diff", "dump_config", "grad_accum_steps", "load_config", "parse_overrides",
           "preset_names", "validate", "zero_name", "_valid_keys"]
