"""From a corpus to training batches: ``sources`` (what ``data.source`` names, read as
pieces of documents), ``encode`` (text to ids, tokenizer fitting), ``shards`` (the token
cache's file format), ``prepare`` (``prepare_tokens``: the cached, sharded pipeline) and
``batches`` (random training windows)."""
