"""Measuring an encoder: kNN (knn.py), the linear probe (probe.py), `dbot-eval` (cli.py; `python -m
dbot_ds.evaluate` runs it), and the fine-tune hand-off to timm (`python -m dbot_ds.finetune`, finetune.py)."""
