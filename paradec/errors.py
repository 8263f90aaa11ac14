"""Exceptions paradec raises for bad input. Each message names the file, key or parameter."""


class ParadecError(Exception):
    """Base class of paradec's own errors."""


class ConfigError(ParadecError, ValueError):
    """A configuration value is missing, unknown or out of its allowed range."""


class CheckpointError(ParadecError, ValueError):
    """A checkpoint directory is incomplete or does not match its config."""


class InputError(ParadecError, ValueError):
    """Tensors or prompts handed to a model do not fit its layout or limits."""


def require_key(config: dict, key: str, source: str):
    """config[key], or a CheckpointError naming the file and the key."""
    if key not in config:
        raise CheckpointError(f"{source}: missing key {key!r}")
    return config[key]
