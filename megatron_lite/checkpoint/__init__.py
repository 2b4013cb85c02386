"""Checkpoints: the TP layout table (layout.py), shard directories (shards.py, loader.py),
the converters (convert.py, gguf.py) and their command line (cli.py). Nothing is imported
here, so that ``convert_hf_checkpoint.py --help`` does not load torch."""
