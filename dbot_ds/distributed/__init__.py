"""Processes and DeepSpeed: the process group and the few collectives the trainer needs (groups.py), the
heartbeat that names a lost rank (watchdog.py), DeepSpeed's one-off CPU op build (op_build.py), and the
student's DeepSpeed engine with the stage-end weight writes that teachers, eval and the trainer share (engine.py)."""
