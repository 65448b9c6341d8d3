"""Weights & Biases as a third sink of the MetricsLogger (run.wandb=true; `pip install -e '.[wandb]'`), rank 0 only.

It logs what metrics.jsonl holds: every numeric field of a log record under its own name (`loss`, `lr`,
`grad_norm`, `img_per_s_per_gpu`, `data_wait_frac`, `skipped_samples`, `skipped_steps`, ...), the kNN monitor's
`eval` records as `eval/<model>/<metric>` (as TensorBoard), and the other events (`stage_switch`, `checkpoint`,
`stopped`, `resumed`) as `<event>/<field>`, all at the training step (W&B's step = ours). The run's config is the
resolved one (optim.precision as chosen, never `auto`).

Offline by default: without an API key (no WANDB_API_KEY, no entry for the W&B host in ~/.netrc or $NETRC) the run
is written offline, with one start line naming its folder and the `wandb sync` command that uploads it. A
WANDB_MODE set by the user decides instead. An online start that fails (no network) falls back to offline rather
than stopping the training. W&B's files go into the run folder (run_dir/wandb/); the W&B run id is kept in
run_dir/wandb_id.txt, so a resumed run continues the same W&B run.
"""
from __future__ import annotations

import netrc
import os
import secrets
import string
import sys
from pathlib import Path
from urllib.parse import urlparse

ID_FILE = "wandb_id.txt"


def api_key_configured(env: dict | None = None) -> bool:
    """True if W&B would find an API key: WANDB_API_KEY, or a ~/.netrc ($NETRC) entry for the W&B host
    (api.wandb.ai, or WANDB_BASE_URL's), which is where `wandb login` stores it."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(env["NETRC"]) if env.get("NETRC") else Path.home() / ".netrc"
    try:
        auth = netrc.netrc(str(path)).authenticators(host) if path.is_file() else None
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def choose_mode(env: dict | None = None) -> tuple[str | None, str]:
    """(mode for wandb.init, why): None lets the user's WANDB_MODE decide."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return None, f"WANDB_MODE={env['WANDB_MODE']}"
    if api_key_configured(env):
        return "online", "an API key is configured"
    return "offline", "no W&B API key configured: no WANDB_API_KEY, no `wandb login`"


def run_id(run_dir: Path, resumed: bool) -> str:
    """The W&B run id: a resumed run's own (run_dir/wandb_id.txt), else a new one, written there."""
    path = run_dir / ID_FILE
    if resumed and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))   # W&B's id form
    tmp = path.with_name(ID_FILE + ".tmp")
    tmp.write_text(new + "\n")
    os.replace(tmp, path)
    return new


class WandbSink:
    """One W&B run for this run folder; `log` takes the records MetricsLogger writes to metrics.jsonl."""

    def __init__(self, run_dir: Path, config: dict, resumed: bool):
        import wandb
        r = config["run"]
        mode, why = choose_mode()
        args = dict(project=r["wandb_project"], name=r["wandb_name"] or Path(r["out_dir"]).resolve().name,
                    id=run_id(run_dir, resumed), resume="allow", dir=str(run_dir))
        try:
            self.run = wandb.init(mode=mode, **args)
        except Exception as e:       # online, but W&B cannot be reached: keep training, log offline
            if mode == "offline" or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
                raise
            why = (str(e).splitlines() or [type(e).__name__])[0]
            print(f"[dbot] warning: W&B online start failed ({why}); logging this run offline instead",
                  file=sys.stderr, flush=True)
            mode, why = "offline", "the online start failed"
            wandb.teardown()          # the failed start still holds the run id
            self.run = wandb.init(mode=mode, **args)
        self.run.config.update(config, allow_val_change=True)   # the resolved config; a resume may change run.*
        self.floor = int(getattr(self.run, "step", 0) or 0)     # an online resume continues after W&B's last step
        print(f"[dbot] {self._describe(why)}", flush=True)

    def _describe(self, why: str) -> str:
        s = self.run.settings
        mode = str(getattr(s, "mode", "") or os.environ.get("WANDB_MODE", "")).lower()
        if getattr(self.run, "disabled", False) or mode == "disabled":
            return f"wandb: disabled ({why}): nothing is logged to W&B"
        if mode in ("offline", "dryrun") or getattr(s, "_offline", False):
            folder = Path(getattr(s, "sync_dir", "") or Path(self.run.dir).parent)
            parts = sorted(folder.parent.glob(f"offline-run-*-{self.run.id}"))   # one per invocation of this run
            target = folder if len(parts) <= 1 else folder.parent / f"offline-run-*-{self.run.id}"
            return (f"wandb: offline run {self.run.id} ({why}) in {folder}; upload it with `wandb sync {target}`"
                    + (f" (its {len(parts)} offline parts, one per invocation, in order)" if len(parts) > 1 else ""))
        return f"wandb: run {self.run.id} at {self.run.url}"

    def log(self, record: dict) -> None:
        """One metrics.jsonl record: a log record's scalars, an `eval` event's scores, another event's fields."""
        step = record.get("step", self.floor)
        name = record.get("event")
        if name is None:
            row = {k: v for k, v in record.items() if _number(v) and k not in ("step", "time")}
        elif name == "eval":
            row = {f"eval/{record['model']}/{k}": v for k, v in record.items()
                   if (k.startswith("knn_") or k == "seconds") and _number(v)}
        else:
            row = {f"{name}/{k}": v for k, v in record.items()
                   if k not in ("event", "step", "time") and (_number(v) or isinstance(v, (str, bool)))}
        if step < self.floor:         # before the step an online resume continues from: logged already (the
            if name is None:          # same batches), but an event is logged at the first step still open
                return
            step = self.floor
        if row:
            self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
