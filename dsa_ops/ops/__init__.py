"""torch.library definitions of every dsa op. Importing this package registers them (once)."""
from . import indexer, attention, loss, v4  # noqa: F401  (registration side effects)
from ._library import SCHEMAS  # noqa: F401
from . import nsa  # noqa: F401,E402  (Native Sparse Attention, SPEC section 8)
