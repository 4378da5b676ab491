"""Typed run configuration: YAML + dotted CLI overrides, validated before any work."""


class ConfigError(ValueError):
    """A user mistake in the configuration or its inputs; the CLI prints it as one line and exits with code 2."""
