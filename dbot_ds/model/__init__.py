"""The networks: the MAE-style asymmetric student and BEiT-style symmetric student, their encoders (vit.py), the
masks (masking.py), the losses (objective.py), FLOPs per image (flops.py) and the FP8 teacher forward (fp8.py).
Imports only `dbot_ds.config`: everything here runs without DeepSpeed or a GPU."""
