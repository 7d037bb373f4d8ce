"""dkit: disguise image datasets with a secret key, train on the disguise, measure the privacy.

The library comes first; the ``dkit`` command is a thin skin over it.
"""

from .errors import DkitError
from .keystore import Keystore, LoadedKey
from .params import KeyParams
from .secret import Seed

__version__ = "0.1.0"

__all__ = ["DkitError", "KeyParams", "Keystore", "LoadedKey", "Seed", "__version__"]
