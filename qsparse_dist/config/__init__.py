"""Run configuration: pydantic schema, YAML loading and ``key.path=value`` overrides."""

from .load import ConfigError, config_from_dict, dump_config, load_config, parse_overrides
from .schema import PROJECTIONS, RunConfig

__all__ = ["PROJECTIONS", "ConfigError", "RunConfig", "config_from_dict", "dump_config", "load_config", "parse_overrides"]
