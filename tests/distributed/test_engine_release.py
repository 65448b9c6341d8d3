"""A destroyed DeepSpeed engine must free its module, optimizer and partitions: DeepSpeed 0.19.8's ZeRO-3 keeps
them alive through a module-level stack and a class-level lru_cache (engine.destroy_engine clears both). Without
that, every teacher swap under teacher.placement=zero3 leaks the old teacher, and each ZeRO-3 case of a
benchmark sweep leaks a whole student engine into the next case's memory."""
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow       # every test here starts real processes or trains a run

SCRIPT = textwrap.dedent("""
    import argparse, gc, weakref, torch
    from dbot_ds.bench import step as bench_step
    from dbot_ds.config import load_config
    from dbot_ds.distributed.groups import init_distributed
    from dbot_ds.model.vit import build_student
    from dbot_ds.teachers.placement import Teacher
    rank, world, device = init_distributed()
    cfg = load_config(overrides=["schedule.stage_steps=[1]", "teacher.placement=zero3"])
    state = build_student(cfg.model, seed=0).encoder.state_dict()
    teacher, x = Teacher(cfg, device, torch.bfloat16), torch.randn(2, 3, 32, 32).to(torch.bfloat16)
    teacher.rebuild(cfg.model.depth, state)
    old = weakref.ref(teacher.engine)
    teacher(x)
    teacher.rebuild(cfg.model.depth, state)                     # the swap
    teacher(x)
    gc.collect()
    print("old teacher alive:", old() is not None)
    teacher.release()
    p = argparse.ArgumentParser(); bench_step.add_arguments(p)
    bench_step.measure(p.parse_args("--arch vit_tiny_patch4 --micro-batch 4 --steps 1 --warmup 1 --zero zero3 "
                                    "--teacher zero3".split()), world, device)
    gc.collect()
    print("engines alive:", sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects()))
""")


def test_destroyed_zero3_engines_are_freed():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "old teacher alive: False" in proc.stdout, proc.stdout
    assert "engines alive: 0" in proc.stdout, proc.stdout
