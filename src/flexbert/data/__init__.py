"""The data path: tokenizers, MDS shards, stream mixtures, MLM masking and sequence packing.

Depends on torch, numpy, tokenizers and mosaicml-streaming; never on the training layer.
"""
