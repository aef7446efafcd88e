"""petseg's configuration (moved into a package; split into schema, layers and checks next)."""

from petseg.config.sections import *  # noqa: F401,F403
from petseg.config.sections import (  # noqa: F401
    _explain,
)
from petseg.errors import ConfigError  # noqa: F401
