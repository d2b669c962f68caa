"""Pure-torch references: the CPU implementation of every op and the oracle every kernel is tested against.

One module per op family (indexer, attention, loss); each function has the signature in
docs/IMPLEMENTATIONS.md. They chunk over query rows so memory stays bounded.
"""
