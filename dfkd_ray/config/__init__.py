"""One typed, validated configuration for a whole job.

A job's config is a YAML file under ``jobs/configs/`` plus dotted ``section.key=value`` overrides
from the command line (``teachers.0.path=...`` indexes lists). :func:`load_config` validates the
schema (:mod:`~dfkd_ray.config.schema`) and raises one :class:`ConfigError` listing every problem
with its field path and the fix (:mod:`~dfkd_ray.config.loading`). Loading has no side effects:
the filesystem and the machine are checked by :func:`dfkd_ray.preflight.preflight`, which job
scripts run through :func:`dfkd_ray.preflight.parse_job_args` before Ray starts.

Pure pydantic + PyYAML: importing this package imports neither torch, transformers nor Ray.
"""

from dfkd_ray.config.loading import (ConfigError, apply_overrides, load_config, read_config, salvage_config,
                                     validate_config)
from dfkd_ray.config.schema import (AmalgamationConfig, AttentionKernels, CorpusConfig,
                                    EmbeddingGuessingConfig, EvalConfig, JobConfig, OutputConfig, RandomWordsConfig,
                                    RayConfig, SearchDim, SteeredConfig, StudentConfig, TeacherConfig, TrainConfig,
                                    TransferConfig, TuneConfig)

__all__ = [
    "AmalgamationConfig", "AttentionKernels", "ConfigError", "CorpusConfig", "EmbeddingGuessingConfig", "EvalConfig",
    "JobConfig", "OutputConfig", "RandomWordsConfig", "RayConfig", "SearchDim",
    "SteeredConfig", "StudentConfig", "TeacherConfig", "TrainConfig", "TransferConfig", "TuneConfig",
    "apply_overrides", "load_config", "read_config", "salvage_config", "validate_config",
]
