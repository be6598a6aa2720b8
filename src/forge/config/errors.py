class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the dotted key."""
