"""`dbot-bench` (cli.py, a dispatcher) and its subcommands, one module each; `python -m dbot_ds.bench` is the
same command."""
