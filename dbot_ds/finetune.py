"""`python -m dbot_ds.finetune EXPORT ...`: the fine-tune hand-off; the code is dbot_ds/evaluate/finetune.py."""
from dbot_ds.evaluate.finetune import cli

if __name__ == "__main__":
    raise SystemExit(cli())
