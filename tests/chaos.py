r"""Chaos test: SIGKILL the whole 2-process training job at random and targeted moments, resume it each time with
`--resume auto`, and check that nothing a kill leaves behind breaks the run or piles up.

    python tests/chaos.py --kills 30 --seed 0 --out /tmp/chaos                      # both data modes, 30 kills each
    python tests/chaos.py --kills 5 --variants resampled --out /tmp/chaos_quick      # a quick look
    python tests/chaos.py --kills 30 --private-shm ...     # a /dev/shm of its own (root): on a shared machine

The job is `deepspeed --num_gpus 2 --module dbot_ds.pretrain --preset demo` on a tiny two-stage plan (CPU, gloo).
The launcher runs in a session of its own, so `killpg(SIGKILL)` takes the launcher and both ranks at once, as a
node loss or a scheduler's hard kill does. Kill moments (targets):
  startup        a random moment before the launch logs anything: imports, process group, DeepSpeed's shm
                 buffers, engine build, checkpoint verification and load
  resume         right after the `resumed` event
  ckpt_write     a checkpoint tag folder exists without COMPLETE (DeepSpeed shards, teacher.pt, hashes), plus
                 0-25 ms
  before_switch  right after the step before the stage end is logged
  during_switch  right after the stage-end step is logged: the teacher swap is running
  switch_ckpt    0-20 ms after the `stage_switch` event: the stage-end checkpoint is being written
  after_switch   right after the first step of the new stage is logged
  random         a random moment between the launch's first record (`resumed`, or step 1) and the ceiling step
No kill may let the run finish, and none may carry it past the stage end (or past the first step after it) while
a kill that needs the run before that point is still to come (`next_target`).
After every kill the run folder must hold: `latest` naming a complete tag; every complete tag with all its files
(sizes and SHA-256 as COMPLETE records them, and DeepSpeed's per-rank files); a metrics.jsonl whose every line
parses. Then the next launch must resume from exactly the tag `--resume auto` should pick. Leftovers are counted
after every kill: DeepSpeed's CPU all-reduce buffers in /dev/shm from our launches, partial tags, `*.tmp` files.
At the end the run is resumed to completion and its per-step losses must equal (==, bit for bit) those of an
uninterrupted run in the same layout (2 ranks, ZeRO-2).

A launch that dies by itself is a violation, except a rank killed by a signal from outside (reported as a crash
of its own, checked like a kill, and its kill moment tried again): on a shared machine another process can do
that, e.g. one that unlinks a starting job's /dev/shm buffer makes its rank segfault in DeepSpeed's shm init.

It lives in tests/ rather than launch/: it proves a property of the trainer on a toy job, it is not a way to
start training, and tests/test_chaos.py runs a short variant of it in CI.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import _env, free_port  # the same environment and port picking as the test suite's launches

ROOT = Path(__file__).resolve().parents[1]
STAGE_STEPS, SAVE_EVERY = 12, 3            # two stages of 12 steps, a checkpoint every 3 steps
TOTAL = 2 * STAGE_STEPS
SWITCH = STAGE_STEPS                       # the stage end (the only switch)
# tests/conftest.py's TINY plus the chaos plan; every key once (dbot-pretrain refuses a key given twice).
JOB = ["schedule.stage_epochs=[]", "schedule.warmup_epochs=0", "optim.global_batch=16", "optim.micro_batch=8",
       "data.num_workers=0", "data.shuffle_buffer=32", "run.progress=false", "eval.shards=", "eval.synthetic_num=0",
       f"schedule.stage_steps=[{STAGE_STEPS},{STAGE_STEPS}]", "schedule.warmup_steps=2", "run.log_every=1",
       f"run.save_every={SAVE_EVERY}", "deepspeed.config=zero2", "optim.precision=fp32"]
VARIANTS = {"resampled": "data.resampled=true", "exact": "data.resampled=false"}
TARGETS = ("startup", "resume", "ckpt_write", "before_switch", "during_switch", "switch_ckpt", "after_switch", "random")
# Share of the kills per target (largest remainder; ties go to the earlier target in PRIORITY).
WEIGHTS = {"startup": 3, "resume": 2, "ckpt_write": 3, "before_switch": 1, "during_switch": 1, "switch_ckpt": 1,
           "after_switch": 1, "random": 3}
PRIORITY = ("ckpt_write", "startup", "random", "resume", "switch_ckpt", "during_switch", "before_switch", "after_switch")
PRE_SWITCH = ("before_switch", "during_switch", "switch_ckpt")    # only while the stage-end checkpoint is not done
TAG_RE = re.compile(r"^step(\d{8})$")
SHM_GLOB = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"
LAUNCH_TIMEOUT_S = 600


# ----------------------------------------------------------------------------------------------------------
# The job


def job_env() -> dict:
    return _env()


def job_cmd(port: int, shards: Path, run_dir: Path, variant: str) -> list[str]:
    exe = shutil.which("deepspeed")
    launcher = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return launcher + ["--num_gpus", "2", "--master_port", str(port), "--module", "dbot_ds.pretrain", "--preset",
                       "demo", "--resume", "auto"] + JOB + [VARIANTS[variant], f"data.shards={shards}",
                                                            f"run.out_dir={run_dir}"]


@dataclasses.dataclass
class Launch:
    proc: subprocess.Popen
    port: int
    t0: float          # wall clock at start (metrics records carry wall-clock `time`)
    log: Path


def start(shards: Path, run_dir: Path, variant: str, log: Path) -> Launch:
    port = free_port()
    with open(log, "w") as f:              # a file: an unread pipe would fill and block the job
        proc = subprocess.Popen(job_cmd(port, shards, run_dir, variant), cwd=ROOT, env=job_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Launch(proc, port, time.time(), log)


def group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(Path(stat).parent.name))
    return out


def kill_job(launch: Launch) -> None:
    """SIGKILL the launcher and both ranks at once, then wait until none of them is left."""
    pgid = launch.proc.pid
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launch.proc.wait()
    deadline = time.monotonic() + 30
    while group_alive(pgid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of group {pgid} survived SIGKILL: {group_alive(pgid)}")
        time.sleep(0.02)


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


# ----------------------------------------------------------------------------------------------------------
# Reading the run folder


def read_records(run_dir: Path) -> list[dict]:
    """Complete lines of metrics.jsonl (a line still being written is left for the next read)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]         # the part after the last newline is not a whole record yet
    out = []
    for line in lines:
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


class Tail:
    """`read_records` that reads the file again only when it changed (polled every few ms while a kill waits)."""

    def __init__(self, run_dir: Path):
        self.path, self.key, self.records = run_dir / "metrics.jsonl", None, []

    def __call__(self) -> list[dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self.key:
            self.key, self.records = (st.st_ino, st.st_size, st.st_mtime_ns), read_records(self.path.parent)
        return self.records


def save_steps() -> list[int]:
    return sorted({s for s in range(SAVE_EVERY, TOTAL + 1, SAVE_EVERY)} | {SWITCH, TOTAL})


def complete_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for d in ckpt_dir.iterdir() if (m := TAG_RE.match(d.name))
                  and (d / "COMPLETE").exists())


def expected_resume_step(ckpt_dir: Path) -> int:
    """The step `--resume auto` must continue from (checkpoint.find_resume_tag's rule), 0 for a fresh start."""
    latest = ckpt_dir / "latest"
    if latest.exists():
        m = TAG_RE.match(latest.read_text().strip())
        if m and (ckpt_dir / m.group(0) / "COMPLETE").exists():
            return int(m.group(1))
    steps = complete_steps(ckpt_dir)
    return steps[-1] if steps else 0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tag_problems(tag_dir: Path, world: int = 2) -> list[str]:
    """What is wrong with a tag that has COMPLETE: files missing or changed against COMPLETE's record, or
    DeepSpeed's files missing (the record is newer than some checkpoints; the file names are DeepSpeed's)."""
    try:
        meta = json.loads((tag_dir / "COMPLETE").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{tag_dir.name}/COMPLETE unreadable ({e})"]
    problems = []
    for name, rec in (meta.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{tag_dir.name}/{name} missing")
        elif path.stat().st_size != rec["size"] or sha256(path) != rec["sha256"]:
            problems.append(f"{tag_dir.name}/{name} differs from COMPLETE's record")
    need = ["mp_rank_00_model_states.pt", "teacher.pt"] + [f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                           for r in range(world)]
    problems += [f"{tag_dir.name}/{pat} missing" for pat in need if not glob.glob(str(tag_dir / pat))]
    return problems


def folder_invariants(run_dir: Path) -> list[str]:
    """Violations in the run folder right after a kill."""
    ckpt_dir, out = run_dir / "checkpoints", []
    latest = ckpt_dir / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if not (ckpt_dir / tag / "COMPLETE").exists():
            out.append(f"latest names {tag!r}, which has no COMPLETE")
    for step in complete_steps(ckpt_dir):
        out += tag_problems(ckpt_dir / f"step{step:08d}")
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for i, line in enumerate(path.read_text().splitlines()):
            try:
                json.loads(line)
            except json.JSONDecodeError:
                out.append(f"metrics.jsonl line {i + 1} does not parse: {line[:80]!r}")
    return out


def shm_files(ports: set[int]) -> list[Path]:
    """DeepSpeed CPU all-reduce buffers of our launches (the name ends in _<addr>_<port>_<rank>)."""
    out = []
    for p in glob.glob(SHM_GLOB):
        parts = p.rsplit("_", 2)
        if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) in ports:
            out.append(Path(p))
    return out


def leftovers(run_dir: Path, ports: set[int], last_port: int | None = None) -> dict:
    """What lies around after a kill. shm_files counts the buffers of every launch of this variant still in
    /dev/shm; shm_left_by_kill those of the launch just killed (measured at once, so another process that
    cleans /dev/shm, e.g. a concurrent pytest's fixture, cannot hide it)."""
    ckpt_dir = run_dir / "checkpoints"
    tags = [d for d in ckpt_dir.iterdir() if TAG_RE.match(d.name)] if ckpt_dir.is_dir() else []
    shm = shm_files(ports)
    files = [p for p in run_dir.rglob("*") if p.is_file()] if run_dir.exists() else []
    return {"shm_files": len(shm), "shm_left_by_kill": len(shm_files({last_port})) if last_port else 0,
            "shm_mb": round(sum(p.stat().st_blocks * 512 for p in shm if p.exists()) / 2**20),
            "partial_tags": sorted(d.name for d in tags if not (d / "COMPLETE").exists()),
            "complete_tags": sum((d / "COMPLETE").exists() for d in tags),
            "tmp_files": sorted(str(p.relative_to(run_dir)) for p in files if p.name.endswith(".tmp")),
            "run_files": len(files)}


# ----------------------------------------------------------------------------------------------------------
# Kill moments


def plan_kills(n: int, rng: random.Random) -> list[str]:
    """n targets in run order. PRE_SWITCH targets need a run that has not finished its stage-end checkpoint, so
    they come in the first half (switch_ckpt last there: its kill may lose the race against that checkpoint);
    after_switch needs one that has, so it opens the second half, and the rest of that half spreads over stage 1."""
    total = sum(WEIGHTS.values())
    counts = {t: n * w // total for t, w in WEIGHTS.items()}
    rest = sorted(TARGETS, key=lambda t: (-(n * WEIGHTS[t] % total), PRIORITY.index(t)))
    for t in rest[:n - sum(counts.values())]:
        counts[t] += 1
    pool = [t for t in TARGETS for _ in range(counts[t]) if t not in PRE_SWITCH + ("after_switch",)]
    rng.shuffle(pool)
    half = len(pool) // 2
    first = pool[:half] + [t for t in ("before_switch", "during_switch") for _ in range(counts[t])]
    rng.shuffle(first)
    second = pool[half:]
    rng.shuffle(second)
    return first + ["switch_ckpt"] * counts["switch_ckpt"] + ["after_switch"] * counts["after_switch"] + second


def feasible(target: str, resume_step: int, ceiling: int = TOTAL - 1) -> bool:
    """Whether a launch from `resume_step` reaches the target's moment before the ceiling step is logged."""
    nxt = [s for s in save_steps() if s > resume_step]
    return {"startup": True, "resume": resume_step > 0,
            "ckpt_write": bool(nxt) and nxt[0] < ceiling,
            "before_switch": resume_step < SWITCH - 1, "during_switch": resume_step < SWITCH,
            "switch_ckpt": resume_step < SWITCH, "after_switch": resume_step <= SWITCH < ceiling,
            "random": resume_step < ceiling}[target]


def next_target(todo: list[str], resume_step: int) -> tuple[str, int, bool]:
    """(target, ceiling step, substituted): the first target of `todo` this launch can reach. While a
    PRE_SWITCH target is still reachable, no other kill may let the run pass the stage end; while after_switch
    is, none may pass the first step of the next stage; while ckpt_write is, none may pass the last checkpoint
    before the final one."""
    pre_left = any(t in PRE_SWITCH and feasible(t, resume_step) for t in todo)
    after_left = "after_switch" in todo and feasible("after_switch", resume_step)
    cap = SWITCH - 1 if pre_left else SWITCH + 1 if after_left else TOTAL - 1
    last_save = max(s for s in save_steps() if s < TOTAL)
    for t in todo:
        own = TOTAL - 1 if t in PRE_SWITCH + ("after_switch",) else cap
        if t != "ckpt_write" and "ckpt_write" in todo and resume_step < last_save:
            own = min(own, last_save - 1)       # leave a checkpoint before the last for the ckpt_write kills
        if feasible(t, resume_step, own):
            todo.remove(t)
            return t, (SWITCH - 1 if t == "before_switch" else own), False
    todo.pop(0)
    return "startup", cap, True


@dataclasses.dataclass
class Timing:
    startup_s: float       # launch -> first metrics record (uninterrupted run)
    step_s: float          # seconds per step while training
    resume_s: float = 0.0  # launch -> `resumed` event: the shortest seen so far (start-up before it is known)


def watch(launch: Launch, run_dir: Path, target: str, resume_step: int, ceiling: int, timing: Timing,
          rng: random.Random) -> dict:
    """Wait for the target's moment and kill the job there (or at the ceiling step, so no kill lets the run
    finish or pass a switch still needed). Returns what was seen at the kill."""
    ckpt_dir = run_dir / "checkpoints"
    startup_at = launch.t0 + rng.uniform(0.0, timing.resume_s if resume_step else timing.startup_s)
    random_after = rng.uniform(0.0, max(0.05, (ceiling - resume_step - 1) * timing.step_s))
    first_seen, write_seen, write_tag, write_delay, reason = None, None, None, 0.0, None
    switch_seen, switch_delay = None, rng.uniform(0.0, 0.02)
    seen: list[dict] = []
    records = Tail(run_dir)
    while reason is None:
        if launch.proc.poll() is not None:
            return {"exited": launch.proc.returncode, "records": seen}
        now = time.time()
        if now - launch.t0 > LAUNCH_TIMEOUT_S:
            reason = "timeout"
            break
        seen = [r for r in records() if r.get("time", 0) >= launch.t0]
        steps = [r["step"] for r in seen if "loss" in r]
        events = [r.get("event") for r in seen]
        if seen and first_seen is None:
            first_seen = now
        if target == "startup" and (now >= startup_at or seen):
            reason = "startup" if not seen else "startup (late: the launch had already logged)"
        elif target == "resume" and "resumed" in events:
            reason = "resume"
        elif target == "ckpt_write" and seen:
            if write_seen is None and ckpt_dir.is_dir():
                for d in ckpt_dir.iterdir():
                    m = TAG_RE.match(d.name)
                    if m and int(m.group(1)) in steps and int(m.group(1)) < TOTAL and not (d / "COMPLETE").exists():
                        write_seen, write_tag, write_delay = now, d, rng.uniform(0.0, 0.025)
                        break
            if write_seen is not None and now - write_seen >= write_delay:
                reason = "ckpt_write" if not (write_tag / "COMPLETE").exists() else "ckpt_write (COMPLETE written)"
        elif target == "before_switch" and SWITCH - 1 in steps:
            reason = target
        elif target == "during_switch" and SWITCH in steps:
            reason = target
        elif target == "switch_ckpt" and "stage_switch" in events:
            switch_seen = switch_seen or now
            if now - switch_seen >= switch_delay:
                reason = target if not (ckpt_dir / f"step{SWITCH:08d}" / "COMPLETE").exists() else \
                    "switch_ckpt (COMPLETE written)"
        elif target == "after_switch" and SWITCH + 1 in steps:
            reason = target
        elif target == "random" and first_seen is not None and now - first_seen >= random_after:
            reason = "random"
        if reason is None and steps and max(steps) >= ceiling:
            reason = f"ceiling (step {ceiling} logged before the {target} moment)"
        if reason is None:
            time.sleep(0.002 if seen else 0.005)
    kill_job(launch)
    seen = [r for r in read_records(run_dir) if r.get("time", 0) >= launch.t0]
    return {"reason": reason, "t": round(time.time() - launch.t0, 3),
            "last_step": max([r["step"] for r in seen if "loss" in r], default=None),
            "events": [r["event"] for r in seen if "event" in r]}


# ----------------------------------------------------------------------------------------------------------
# A variant: reference run, kills, final run, comparison


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_records(run_dir) if "loss" in r]


def reference(shards: Path, out: Path, variant: str) -> tuple[dict[int, float], Timing, float]:
    run_dir = out / "reference"
    for _ in range(3):            # a rank killed by a signal from outside (see run_variant): start it afresh
        shutil.rmtree(run_dir, ignore_errors=True)
        launch = start(shards, run_dir, variant, out / "reference.log")
        rc = launch.proc.wait(timeout=LAUNCH_TIMEOUT_S)
        wall = time.time() - launch.t0
        if rc <= 128:
            break
    if rc != 0:
        raise RuntimeError(f"the uninterrupted {variant} run failed (rc {rc}):\n{tail(launch.log)}")
    cleanup_shm({launch.port})
    recs = [r for r in read_records(run_dir) if "loss" in r]
    steps = [r["step"] for r in recs]
    if steps != list(range(1, TOTAL + 1)):
        raise RuntimeError(f"the uninterrupted run logged steps {steps}")
    startup_s = recs[0]["time"] - launch.t0
    timing = Timing(startup_s, step_s=(recs[-1]["time"] - recs[0]["time"]) / (TOTAL - 1), resume_s=startup_s)
    return {r["step"]: r["loss"] for r in recs}, timing, wall


def cleanup_shm(ports: set[int]) -> None:
    for p in shm_files(ports):
        try:
            p.unlink()
        except OSError:
            pass


def died_of_signal(rc: int, log: Path) -> str | None:
    """How a launch that ended by itself lost a rank to a signal, or None if it failed otherwise. The launcher
    exits with the code of the rank it saw end first: 256 - signal for the dead rank itself, or 4 for a
    survivor that named it ("lost rank N"; the dead rank printed no error of its own)."""
    if rc > 128:
        return f"a rank was killed by signal {256 - rc}"
    text = log.read_text(errors="replace") if log.exists() else ""
    errors = [ln for ln in text.splitlines() if ln.startswith("dbot-pretrain:") or ln.startswith("Traceback")]
    if rc == 4 and errors and all(ln.startswith("dbot-pretrain: lost rank") for ln in errors):
        return "a rank died without an error of its own; its peer stopped with 'lost rank'"
    return None


def say(*args) -> None:
    print(*args, flush=True)


def run_variant(shards: Path, out: Path, variant: str, kills: int | list[str], seed: int, log=say) -> dict:
    """Reference run, the killed launches (`kills`: how many, or the targets in order), the final launch;
    returns the report (`summarize` condenses it)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}:{variant}")
    expected, timing, ref_wall = reference(shards, out, variant)
    log(f"[chaos] {variant}: uninterrupted run {ref_wall:.1f} s (start-up {timing.startup_s:.1f} s, "
        f"{timing.step_s * 1000:.0f} ms/step)")
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    (out / "logs").mkdir(exist_ok=True)
    todo = plan_kills(kills, rng) if isinstance(kills, int) else list(kills)
    ports: set[int] = set()
    report = {"variant": variant, "kills": [], "violations": [], "substituted": 0, "crashes": [], "notes": []}
    i = 0
    while todo:
        resume_step = expected_resume_step(run_dir / "checkpoints")
        pick, ceiling, substituted = next_target(todo, resume_step)
        report["substituted"] += substituted
        launch = start(shards, run_dir, variant, out / "logs" / f"launch{i:03d}.log")
        ports.add(launch.port)
        seen = watch(launch, run_dir, pick, resume_step, ceiling, timing, rng)
        i += 1
        if "exited" in seen:
            rc = seen["exited"]
            if rc == 0:          # the run finished before the moment came: nothing left to kill
                report["notes"].append(f"launch {i} ({pick}) finished the run before its kill")
                break
            todo.insert(0, pick)
            how = died_of_signal(rc, launch.log)
            if how:
                report["crashes"].append({"n": i, "target": pick, "rc": rc, "how": how,
                                          "log_tail": tail(launch.log, 1500)})
                bad = folder_invariants(run_dir)
                report["violations"] += [f"after crash {i}: {v}" for v in bad]
                log(f"[chaos] {variant} launch {i} crashed by itself ({how}); {len(bad)} violations; see {launch.log}")
                continue
            report["violations"].append(f"launch {i} ({pick}) failed by itself with rc {rc}:\n{tail(launch.log)}")
            continue
        if seen["reason"] == "timeout":
            report["violations"].append(f"launch {i} ({pick}) hung: nothing to kill it for in {LAUNCH_TIMEOUT_S} s:"
                                        f"\n{tail(launch.log)}")
        resumed = [r for r in read_records(run_dir) if r.get("event") == "resumed" and r["time"] >= launch.t0]
        if resumed:
            timing.resume_s = min(timing.resume_s or 1e9, resumed[0]["time"] - launch.t0)
        if resumed and not resumed[-1]["tag"].endswith(f"step{resume_step:08d}"):
            report["violations"].append(f"launch {i} resumed from {resumed[-1]['tag']}, expected step {resume_step}")
        if resume_step and not resumed and seen["last_step"] is not None:
            report["violations"].append(f"launch {i} trained without a `resumed` event (expected step {resume_step})")
        bad = folder_invariants(run_dir)
        report["violations"] += [f"after kill {i} ({pick}): {v}" for v in bad]
        left = leftovers(run_dir, ports, launch.port)
        kill = {"n": i, "target": pick, "from_step": resume_step, **seen, **left,
                "latest_after": expected_resume_step(run_dir / "checkpoints"), "violations": len(bad)}
        report["kills"].append(kill)
        log(f"[chaos] {variant} kill {i:2d} {pick:13s} from step {resume_step:2d}: {seen['reason']} at "
            f"{seen['t']:.2f} s, last step {seen['last_step']}, latest -> {kill['latest_after']}; shm {left['shm_files']} "
            f"files {left['shm_mb']} MB, partial tags {left['partial_tags']}, tmp {len(left['tmp_files'])}"
            + (f"; VIOLATIONS {bad}" if bad else ""))
    report.update(final_run(shards, out, variant, run_dir, expected, ports, i))
    report["leftovers_before_cleanup"] = leftovers(run_dir, ports)
    cleanup_shm(ports)
    return report


def final_run(shards: Path, out: Path, variant: str, run_dir: Path, expected: dict[int, float], ports: set[int],
              i: int) -> dict:
    resume_step = expected_resume_step(run_dir / "checkpoints")
    for attempt in range(3):      # again after a rank killed from outside (see run_variant)
        launch = start(shards, run_dir, variant, out / "logs" / f"launch{i:03d}_final{attempt}.log")
        ports.add(launch.port)
        rc = launch.proc.wait(timeout=LAUNCH_TIMEOUT_S)
        if rc <= 128:
            break
    res = {"final_rc": rc, "final_from_step": resume_step, "final_attempts": attempt + 1, "final_violations": []}
    v = res["final_violations"]
    if rc != 0:
        v.append(f"the final launch failed (rc {rc}):\n{tail(launch.log)}")
    got = losses(run_dir)
    steps = [s for s, _ in got]
    if steps != list(range(1, TOTAL + 1)):
        v.append(f"metrics.jsonl logs steps {steps}, expected 1..{TOTAL} once each")
    diffs = {s: abs(loss - expected[s]) for s, loss in got if s in expected}
    res["max_abs_loss_diff"] = max(diffs.values(), default=None)
    res["losses_identical"] = len(diffs) == TOTAL and all(d == 0.0 for d in diffs.values())
    if not res["losses_identical"]:
        v.append(f"losses differ from the uninterrupted run (max |diff| {res['max_abs_loss_diff']})")
    switches = [r["step"] for r in read_records(run_dir) if r.get("event") == "stage_switch"]
    if switches != [SWITCH]:
        v.append(f"stage_switch events at steps {switches}, expected [{SWITCH}]")
    ref_tags = sorted(d.name for d in (out / "reference" / "checkpoints").iterdir() if TAG_RE.match(d.name))
    tags = sorted(d.name for d in (run_dir / "checkpoints").iterdir() if TAG_RE.match(d.name))
    if tags != ref_tags:
        v.append(f"checkpoint tags {tags} differ from the uninterrupted run's {ref_tags}")
    v += folder_invariants(run_dir)
    return res


# ----------------------------------------------------------------------------------------------------------
# Summary


def summarize(report: dict) -> dict:
    kills = report["kills"]
    by_target: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    for k in kills:
        by_target[k["target"]] = by_target.get(k["target"], 0) + 1
        moment = k["reason"] + (" (resuming from a checkpoint)" if k["reason"] == "startup" and k["from_step"] else "")
        by_reason[moment] = by_reason.get(moment, 0) + 1
    return {"kills": len(kills), "by_target": by_target, "by_moment": by_reason,
            "violations": len(report["violations"]) + len(report["final_violations"]),
            "crashes_of_their_own": [f"launch {c['n']}: {c['how']}" for c in report["crashes"]],
            "losses_identical": report["losses_identical"], "max_abs_loss_diff": report["max_abs_loss_diff"],
            "shm_files_max": max((k["shm_files"] for k in kills), default=0),
            "shm_files_after_last_kill": kills[-1]["shm_files"] if kills else 0,
            "shm_files_left_by_kills": sum(k["shm_left_by_kill"] for k in kills),
            "shm_mb_max": max((k["shm_mb"] for k in kills), default=0),
            "partial_tags_max": max((len(k["partial_tags"]) for k in kills), default=0),
            "tmp_files_max": max((len(k["tmp_files"]) for k in kills), default=0),
            "run_files_first_last": [kills[0]["run_files"], kills[-1]["run_files"]] if kills else [],
            "at_end": report["leftovers_before_cleanup"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30, help="kills per variant (default 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/chaos"))
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="resampled: data.resampled=true; exact: data.resampled=false (exact epochs)")
    ap.add_argument("--private-shm", action="store_true",
                    help="run in a mount namespace of its own with a fresh /dev/shm (needs root or CAP_SYS_ADMIN): "
                         "on a shared machine, other jobs' cleanup of /dev/shm then cannot crash or hang ours, and "
                         "the leftovers counted are ours alone")
    args = ap.parse_args(argv)
    if args.private_shm and os.environ.get("DBOT_CHAOS_PRIVATE_SHM") != "1":
        rest = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--private-shm"]
        os.environ["DBOT_CHAOS_PRIVATE_SHM"] = "1"
        inner = " ".join(shlex.quote(a) for a in [sys.executable, str(Path(__file__).resolve()), *rest])
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              f"mount -t tmpfs -o size=8g tmpfs /dev/shm && exec {inner}"])
    from dbot_ds.data.synthetic import write_synthetic_shards
    args.out.mkdir(parents=True, exist_ok=True)
    shards = args.out / "shards"
    if not (shards / "manifest.json").exists():
        write_synthetic_shards(shards, 256, img_size=64, per_shard=64, seed=0)
    t0, results = time.time(), {}
    for variant in args.variants:
        report = run_variant(shards, args.out / variant, variant, args.kills, args.seed)
        results[variant] = {"summary": summarize(report), **report}
        (args.out / "report.json").write_text(json.dumps(results, indent=1))
    say(f"[chaos] {time.time() - t0:.0f} s; report: {args.out / 'report.json'}")
    ok = True
    for variant, res in results.items():
        s = res["summary"]
        say(f"[chaos] {variant}: " + json.dumps(s))
        for v in res["violations"] + res["final_violations"]:
            say(f"[chaos] {variant} VIOLATION: {v}")
        ok &= s["violations"] == 0 and s["losses_identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
