"""The data path (the training extra): tokenizer training, MDS shards, stream mixtures, MLM masking
and sequence packing.

Depends on the core, numpy, tokenizers and mosaicml-streaming; never on the training layer.
"""
