"""The project's exceptions: anything a user can cause ends as one clear line and exit code 2."""


class PocketLMError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


class ConfigError(PocketLMError):
    """A config key, value or file is wrong."""
