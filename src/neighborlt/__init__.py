"""neighborlt: long-tail image classification by category extrapolation.

Add open-set auxiliary classes that look like the target classes, train on both with the
neighbor-silencing loss, and drop the auxiliary classifier rows at inference.
"""

from .errors import ConfigError, DataError, NeighborLTError
from .paths import resolve_data_dir
from .registry import Registry
from .rundir import RunDir

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "NeighborLTError", "Registry", "RunDir", "__version__", "resolve_data_dir"]
