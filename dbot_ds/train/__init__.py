"""Training: the loop with its stage swaps (trainer.py), the precision choice (precision.py), the run guards
(guards.py), the online kNN monitor (monitor.py) and the metrics log (metrics.py). `dbot-pretrain` is
dbot_ds/pretrain.py."""
