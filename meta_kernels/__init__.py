"""Fake (meta) implementations of every dsa op: exact output shapes, dtypes and strides, no computation.

Importing this package registers them; `dsa_ops` imports it right after defining the ops.
"""
from . import indexer, attention, loss, v4  # noqa: F401  (registration side effects)
from . import nsa  # noqa: F401,E402  (Native Sparse Attention, SPEC section 8)
