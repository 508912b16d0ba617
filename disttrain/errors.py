"""The project's error types: mistakes a user can fix, found before any compute starts.

`disttrain.runtime.entrypoint` (and `disttrain launch`) turn either into one line on stderr and
exit code 2. Both are re-exported where they always lived: `disttrain.config.ConfigError`,
`disttrain.data.shards.DataError`. This module imports nothing of the project, so any layer
(models, data, runtime) can raise them without importing the configs.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration mistake, reported before any compute starts."""


class DataError(ValueError):
    """Missing or malformed data, reported before training starts."""


class MissingShardError(DataError):
    """A shard the manifest lists is not on disk (any more)."""
