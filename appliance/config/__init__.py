"""Configuration: the settings schema and the loader that merges and validates TOML files."""

from __future__ import annotations

from appliance.config.load import (
    DEFAULT_CONFIG,
    ConfigError,
    LoadedConfig,
    Problem,
    load_config,
    render_origins,
    render_toml,
)
from appliance.config.schema import (
    Change,
    Reload,
    RestartWhile,
    SettingInfo,
    Settings,
    diff_settings,
    iter_settings,
    reload_policy,
    resolve_control_path,
)

__all__ = [
    "DEFAULT_CONFIG",
    "Change",
    "ConfigError",
    "LoadedConfig",
    "Problem",
    "Reload",
    "RestartWhile",
    "SettingInfo",
    "Settings",
    "diff_settings",
    "iter_settings",
    "load_config",
    "reload_policy",
    "render_origins",
    "render_toml",
    "resolve_control_path",
]
