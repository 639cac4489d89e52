"""The core install (``pip install flexbert``): the model, the checkpoint layer, and what uses a
trained model (exports, encoding, retrieval evaluation). torch, transformers and tokenizers; never
Composer or mosaicml-streaming, so it runs on today's torch and transformers 5.x too.
"""
