"""Utilities with no dependency on the rest of hessfast: data batches, model state, memory,
serialisation and plotting. Every other layer may import from here; this package imports from none."""
