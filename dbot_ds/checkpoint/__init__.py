"""Checkpoints: save and load with a COMPLETE marker (store.py), the hash and pickle scan before anything is
loaded (safety.py), resharding to another world size or ZeRO stage (reshard.py), storage errors that name the
fix (storage.py), whether a checkpoint can continue under a config (resume.py), and the exported encoder:
its format, writers and loaders (export.py) and the `dbot-export` command (export_cli.py)."""
