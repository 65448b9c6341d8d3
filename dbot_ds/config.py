"""One typed config for a dBOT run: dataclasses, loaded from YAML, overridden from the CLI, validated once.

Precedence (lowest first): dataclass defaults < the architecture named by `model.arch` < the YAML file
(`--preset` or `--config`) < `key=value` overrides from the command line. Unknown keys and values of the
wrong type fail with a message that names the key (and close matches). The resolved config is written into the
run folder as `config.yaml` and stored in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

# Architectures are presets of ModelConfig fields. Encoder params: B 86.6 M, L 304.3 M, H 630.8 M, g ~1.0 B,
# G ~1.8 B. The decoder is the reference's (512 wide, 8 blocks, 16 heads) except for the toy sizes.
_DEC = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch4": dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0,
                            decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    "vit_small_patch8": dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=6, mlp_ratio=4.0,
                             decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, **_DEC),
    "vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, **_DEC),
    "vit_huge_patch14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, **_DEC),
    "vit_giant_patch14": dict(img_size=224, patch_size=14, embed_dim=1408, depth=40, num_heads=16,
                              mlp_ratio=6144 / 1408, **_DEC),
    "vit_gigantic_patch14": dict(img_size=224, patch_size=14, embed_dim=1664, depth=48, num_heads=16,
                                 mlp_ratio=8192 / 1664, **_DEC),
}


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key and the fix."""


@dataclass
class ModelConfig:
    arch: str = "vit_tiny_patch4"      # fills the fields below; any of them may still be set explicitly
    img_size: int = 32                 # pixels
    patch_size: int = 4                # pixels
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 64
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    mask_ratio: float = 0.75           # fraction of patches hidden from the student
    drop_path: float = 0.0             # student stochastic depth (teacher: always 0)
    act_ckpt_every: int = 0            # activation checkpointing: 0 off, 1 every block, k every k-th block
    compile: bool = False              # torch.compile each transformer block (student and teacher)
    student: str = "asymmetric"        # asymmetric: MAE encoder (visible patches) + decoder, the bootstrapped recipe;
                                       # symmetric: BEiT-style encoder over all patches with mask tokens, the CLIP recipe
    mask: str = "random"               # random: per-sample, model.mask_ratio; block: BEiT block-wise, num_mask_patches
                                       # (symmetric student only)
    num_mask_patches: int = 0          # block: patches to hide per image (reference 78; an image may end with fewer)
    min_mask_patches_per_block: int = 16   # block: smallest block area drawn (reference default 16)
    layer_scale_init: float = 0.1      # symmetric: initial layer scale (reference run.sh 0.1 for B/L/H); 0 = off


@dataclass
class TeacherConfig:
    source: str = "bootstrap"          # bootstrap (the student's own weights), vit (timm / MAE-dBOT checkpoint),
                                       # hf_clip (transformers CLIP vision tower folder): see teacher_sources.py
    weights: str = ""                  # vit: .safetensors/.pth file; hf_clip: save_pretrained folder
    arch: str = ""                     # vit: expected architecture (checked against the weights); "": inferred
    num_heads: int = 0                 # vit: attention heads; 0: from the checkpoint's metadata or teacher.arch, else
                                       # from a width with one known head count; other widths must set it
    layer: int = -1                    # hf_clip: hidden state used as target; -1: the last
    init_depth: int = 0                # stage-0 teacher depth (reference: 12 for ViT-B, 0 for L/H)
    final_norm: bool = False           # reference default tlayernorm=0: targets are pre-norm features
    placement: str = "replicated"      # "replicated": plain bf16 module per rank; "zero3": partitioned engine
    offload: bool = False              # with placement zero3: keep the teacher's partitions in CPU memory
    clip_target: str = "hidden"        # hf_clip: hidden = hidden state `teacher.layer` (before ln_post, unprojected);
                                       # post_norm_proj = every token through ln_post + the visual projection
                                       # (reference --post_patch_norm True; needs a folder holding visual_projection)
    input_size: int = 0                # vit / hf_clip: pixels the teacher reads (bicubic resize of the student's
                                       # input) so its token grid equals the student's; 0 = model.img_size. E.g. 196
                                       # for a /14 teacher beside a /16 student, 256 for a /16 teacher beside a /14 one
    precision: str = "bf16"            # with optim.precision=bf16: bf16 = bf16 weights, bf16 residual stream;
                                       # fp32 = fp32 weights under bf16 autocast (bf16 matmuls, fp32 residual stream,
                                       # as the reference's fp32 weights under fp16 autocast). bf16: on ViT-B the
                                       # bf16 targets keep a per-token cosine of 0.9999+ to fp32 ones (BENCHMARKS.md,
                                       # "Numerics"), for half the memory. optim.precision=fp32: the teacher is fp32


@dataclass
class ScheduleConfig:
    stage_epochs: list[float] = field(default_factory=list)  # e.g. [800, 800]; or use stage_steps
    stage_steps: list[int] = field(default_factory=list)     # exactly one of stage_epochs / stage_steps
    warmup_epochs: float = 0.0         # per stage; or warmup_steps (not both)
    warmup_steps: int = 0
    reset_optimizer: bool = False      # zero AdamW moments and step at each swap (reference keeps them)


@dataclass
class OptimConfig:
    global_batch: int = 64             # images per optimizer step over all ranks
    micro_batch: int = 32              # images per rank per forward; accumulation = global / (micro * world)
    blr: float = 1.5e-4                # base LR; lr = blr * global_batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8                  # AdamW epsilon (the CLIP recipe uses 1e-6)
    clip_grad: float = 0.0             # max global grad norm; 0 = no clipping
    precision: str = "auto"            # auto | bf16 | fp32. auto: bf16 on a GPU that supports it and on a CPU with
                                       # native bf16 matmuls (AVX512-BF16 / AMX), fp32 elsewhere (precision.py); the
                                       # run's config and checkpoints record what was chosen
    grad_reduce_dtype: str = "fp32"    # dtype of the data-parallel gradient reduction (DeepSpeed communication_data_type):
                                       # bf16 | fp32 (optim.precision=fp32 always reduces in fp32). fp32 by default,
                                       # as the reference's DDP all-reduce: measured on ViT-B (BENCHMARKS.md,
                                       # "Numerics"), a bf16 ring adds 0.30% relative error at 8 ranks and 1.06% at
                                       # 32 (fp32: only the 0.19% of storing the result in bf16), about the sampling
                                       # noise of a 4096-image batch; bf16 halves the reduction's bytes
    skip_nonfinite_steps: bool = True  # ZeRO-1/2 + bf16: DeepSpeed checks grads for inf/NaN and skips such steps
                                       # (bf16.check_grad_overflow; ZeRO-3 always does); false: no check, and a
                                       # non-finite gradient poisons the weights (caught as a non-finite loss)
    max_skipped_in_row: int = 3        # stop the run after this many skipped optimizer steps in a row; 0 = never
    max_skipped_frac: float = 0.5      # ... or when this fraction of a log window is skipped (>= 2 skips); 0 = never


@dataclass
class ObjectiveConfig:
    loss: str = "smooth_l1"            # smooth_l1: SmoothL1(beta 2) on per-token standardised targets (bootstrapped
                                       # recipe); neg_cosine: 1 - mean cosine over the loss tokens (CLIP recipe)


@dataclass
class DataConfig:
    shards: str = ""                   # webdataset pattern(s), e.g. /data/in1k/shard-{000000..001281}.tar
    num_samples: int = 0               # images per epoch; 0 = read manifest.json beside the shards
    num_workers: int = 4               # loader processes per rank
    resampled: bool = True             # draw shards with replacement; false: exact epochs (needs manifest counts)
    manifest: str = ""                 # manifest.json for remote shards (pipe:, http); local ones use their own
    shuffle_buffer: int = 1000
    synthetic_num: int = 0             # >0: generate this many synthetic images into `shards`' folder if missing
    stall_timeout_s: float = 30.0      # a remote shard (http, pipe:) that sends no byte this long fails (skipped)
    open_shards: int = 16              # shards each loader worker reads at once, interleaved before the shuffle
                                       # buffer, so shards of one class each still give class-mixed batches
    # Augmentation; defaults: the bootstrapped recipe. The CLIP recipe (reference beit branch): crop_scale
    # [0.4, 1.0] and color_jitter 0.4.
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])   # RandomResizedCrop area [min, max]
    hflip: bool = True                 # random horizontal flip (p 0.5)
    interpolation: str = "bicubic"     # the crop's resize: bicubic or bilinear
    color_jitter: float = 0.0          # ColorJitter brightness = contrast = saturation = this (hue 0), applied to
                                       # the whole image before the crop as the reference does; 0 = off


@dataclass
class EvalConfig:
    """The online kNN monitor (monitor.py): off unless eval.shards is set."""
    shards: str = ""                   # labelled webdataset shards (a `cls` key): the kNN bank (and queries)
    query_shards: str = ""             # the queries; "": every eval.query_every-th sample of eval.shards is a query
    query_every: int = 5
    every_steps: int = 1000            # also always at step 0 and at each stage end (student, then the new teacher)
    k: int = 20                        # DINO's weighted kNN: k neighbours, weights exp(cosine / temperature)
    temperature: float = 0.07
    max_images: int = 0                # read at most this many images of each pattern (0: all); decoded once per run
    synthetic_num: int = 0             # >0: generate this many labelled synthetic images into eval.shards if missing


@dataclass
class DeepSpeedConfig:
    config: str = ""                   # ds_configs/ name (zero2 or 2, zero3 or 3, zero3_offload) or a JSON path; "": the
                                       # file accelerate's config names (deepspeed_config_file), else zero2


@dataclass
class RunConfig:
    out_dir: str = "runs/dbot"
    seed: int = 0
    log_every: int = 10                # steps between metric reductions (the only host syncs)
    save_every: int = 500              # steps between checkpoints (plus one at every stage end)
    keep_last: int = 3                 # periodic checkpoints kept; stage-end ones are always kept
    tensorboard: bool = False
    progress: bool = True
    stop_after_steps: int = 0          # >0: train at most this many optimizer steps in this invocation, then save and
                                       # stop (a time-boxed job: the same command again trains the next N steps)
    collective_timeout_s: float = 900.0  # a collective waiting this long for a rank that died or hangs fails,
                                       # naming the rank (covers slow checkpoint writes and start-up counting)
    keep_saved_plan: bool = False      # resume: continue with the checkpoint's stage plan (in steps) even though
                                       # this run's dataset size or loader geometry would give another one


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# Loading and overriding


def _resolve(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _unknown(key: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Valid keys: {', '.join(sorted(choices))}."
    return ConfigError(f"unknown config key '{key}'.{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert `value` (from YAML or a CLI string) to `typ`, or raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    try:
        if origin is list:
            (item,) = typing.get_args(typ)
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce(key, v, item) for v in value]
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise TypeError
        if typ is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unsupported config type {typ}")
    raise ConfigError(f"config key '{key}' expects {getattr(typ, '__name__', typ)}, got {value!r}")


def _flatten(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """{'model': {'depth': 4}} -> {'model.depth': 4}, rejecting anything that is not section.key."""
    flat = {}
    sections = [f.name for f in dataclasses.fields(Config)]
    for section, body in (raw or {}).items():
        if section not in sections:
            raise _unknown(section, sections)
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys, got {body!r}")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def _valid_keys() -> dict[str, Any]:
    keys = {}
    for section in dataclasses.fields(Config):
        cls = _resolve(Config, section.name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys[f"{section.name}.{f.name}"] = hints[f.name]
    return keys


def zero_name(value: str) -> str:
    """One spelling for the ZeRO stage across tools: '2' or 'zero2' -> 'zero2'; 'zero3_offload' and JSON paths pass
    through. dbot-plan, dbot-bench and deepspeed.config all accept either form."""
    value = str(value).strip()
    return f"zero{value}" if value in ("0", "1", "2", "3") else value


def preset_names() -> list[str]:
    return sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['optim.blr=1e-4', ...] -> {'optim.blr': '1e-4'}; each item must be section.key=value, each key once."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. optim.micro_batch=64)")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in out:
            raise ConfigError(f"{key} is given twice ({out[key]!r} and {value!r}); give each key once. An unquoted "
                              "brace pattern is expanded by the shell into one override per shard: quote it, e.g. "
                              "data.shards='/data/shard-{000000..000009}.tar'")
        out[key] = value
    return out


# A stage length or warmup given on the command line replaces the file's other form of it (epochs <-> steps), so
# switching a preset from epochs to steps takes one override, not four.
_EXCLUSIVE = {"schedule.stage_steps": "schedule.stage_epochs", "schedule.stage_epochs": "schedule.stage_steps",
              "schedule.warmup_steps": "schedule.warmup_epochs", "schedule.warmup_epochs": "schedule.warmup_steps"}


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for key in overrides:
        other = _EXCLUSIVE.get(key)
        if other and other not in overrides:
            out.pop(other, None)
    out.update(overrides)
    if "schedule.stage_steps" in overrides and "schedule.warmup_epochs" in raw and not any(
            k in overrides for k in ("schedule.warmup_epochs", "schedule.warmup_steps")):
        out.pop("schedule.warmup_epochs")        # epochs-based warmup cannot go with steps-based stages
    return out


def load_config(path: str | Path | None = None, preset: str | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build the run's Config from a preset name or YAML file plus CLI overrides; validate it."""
    if path and preset:
        raise ConfigError("give either --config or --preset, not both")
    raw: dict[str, Any] = {}
    if preset:
        p = PRESET_DIR / f"{preset}.yaml"
        if not p.exists():
            raise ConfigError(f"unknown preset '{preset}'; shipped presets: {', '.join(preset_names())}")
        path = p
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        raw = _flatten(yaml.safe_load(p.read_text()) or {}, str(p))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return build_config(_apply_overrides(raw, overrides or {}))


def build_config(flat: dict[str, Any]) -> Config:
    """Flat {'section.key': value} -> validated Config (arch preset applied under explicit keys)."""
    valid = _valid_keys()
    for key in flat:
        if key not in valid:
            raise _unknown(key, list(valid))
    cfg = Config()
    arch = _coerce("model.arch", flat.get("model.arch", cfg.model.arch), str)
    if arch not in ARCHS:
        close = difflib.get_close_matches(arch, list(ARCHS), n=3, cutoff=0.5)
        raise ConfigError(f"unknown model.arch '{arch}'. Did you mean: {', '.join(close or ARCHS)}? "
                          "(or set model.embed_dim, model.depth, ... yourself on top of the closest one)")
    values = {f"model.{k}": v for k, v in ARCHS[arch].items()}
    values.update(flat)
    for key, value in values.items():
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, _coerce(key, value, valid[key]))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need no DeepSpeed and no data: fail before anything is built."""
    m, s, o, t = cfg.model, cfg.schedule, cfg.optim, cfg.teacher
    if m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size={m.img_size} is not a multiple of model.patch_size={m.patch_size}")
    for dim, heads, name in ((m.embed_dim, m.num_heads, "model.embed_dim/num_heads"),
                             (m.decoder_embed_dim, m.decoder_num_heads, "model.decoder_embed_dim/decoder_num_heads")):
        if dim % heads:
            raise ConfigError(f"{name}: width {dim} is not divisible by {heads} heads")
    if not 0.0 < m.mask_ratio < 1.0:
        raise ConfigError(f"model.mask_ratio must be in (0, 1), got {m.mask_ratio}")
    if m.act_ckpt_every < 0:
        raise ConfigError("model.act_ckpt_every must be 0 (off), 1 (every block) or k (every k-th block)")
    if not 0 <= t.init_depth <= m.depth:
        raise ConfigError(f"teacher.init_depth={t.init_depth} must be between 0 and model.depth={m.depth}")
    if t.source not in ("bootstrap", "vit", "hf_clip"):
        raise ConfigError(f"teacher.source must be bootstrap, vit or hf_clip, got '{t.source}'")
    if t.source != "bootstrap":
        if not t.weights:
            raise ConfigError(f"teacher.source={t.source} needs teacher.weights (a file or folder of weights)")
        if len(s.stage_epochs or s.stage_steps) != 1:
            raise ConfigError(f"teacher.source={t.source} is the pre-trained-teacher setting: one stage, no swap; "
                              "set a single stage length (e.g. schedule.stage_epochs=[1600])")
    _validate_recipe(cfg)
    if t.placement not in ("replicated", "zero3"):
        raise ConfigError(f"teacher.placement must be 'replicated' or 'zero3', got '{t.placement}'")
    if t.offload and t.placement != "zero3":
        raise ConfigError("teacher.offload=true needs teacher.placement=zero3")
    if bool(s.stage_epochs) == bool(s.stage_steps):
        raise ConfigError("set exactly one of schedule.stage_epochs (e.g. [800,800]) or schedule.stage_steps")
    if any(x <= 0 for x in (s.stage_epochs or s.stage_steps)):
        raise ConfigError("every stage length in schedule.stage_epochs/stage_steps must be > 0")
    if s.warmup_epochs and s.warmup_steps:
        raise ConfigError("set schedule.warmup_epochs or schedule.warmup_steps, not both")
    if s.stage_steps and s.warmup_epochs:
        raise ConfigError("stages given in steps: give the warmup in steps too (schedule.warmup_steps)")
    if o.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"optim.precision must be 'auto', 'bf16' or 'fp32', got '{o.precision}'")
    if o.micro_batch <= 0 or o.global_batch <= 0:
        raise ConfigError(f"optim.global_batch={o.global_batch} and optim.micro_batch={o.micro_batch} must be > 0")
    grad_accum_steps(cfg, 1)          # global a multiple of micro; the error lists micro-batch sizes that work
    if o.max_skipped_in_row < 0 or not 0.0 <= o.max_skipped_frac <= 1.0:
        raise ConfigError("optim.max_skipped_in_row must be >= 0 and optim.max_skipped_frac in [0, 1] (0 disables each)")
    _validate_data(cfg.data)
    _validate_eval(cfg.eval)
    if cfg.run.collective_timeout_s < 10:
        raise ConfigError("run.collective_timeout_s must be >= 10 seconds")
    if cfg.run.log_every <= 0 or cfg.run.save_every <= 0:
        raise ConfigError("run.log_every and run.save_every must be > 0")


def _validate_eval(e: EvalConfig) -> None:
    if not e.shards:                 # `eval.shards=` turns the monitor off, whatever else the preset set for it
        e.query_shards, e.synthetic_num = "", 0
        return
    if e.k < 1 or e.temperature <= 0 or e.every_steps < 0 or e.query_every < 2 or e.max_images < 0:
        raise ConfigError("eval.k must be >= 1, eval.temperature > 0, eval.every_steps >= 0 (0: step 0 and stage "
                          "ends only), eval.query_every >= 2, eval.max_images >= 0")


def _validate_recipe(cfg: Config) -> None:
    """Student variant, masking, loss and CLIP-target choices, and the combinations that are built."""
    m, t = cfg.model, cfg.teacher
    choices = {"model.student": (m.student, ("asymmetric", "symmetric")), "model.mask": (m.mask, ("random", "block")),
               "objective.loss": (cfg.objective.loss, ("smooth_l1", "neg_cosine")),
               "teacher.clip_target": (t.clip_target, ("hidden", "post_norm_proj"))}
    for key, (value, ok) in choices.items():
        if value not in ok:
            raise ConfigError(f"{key} must be one of {', '.join(ok)}, got '{value}'")
    grid = m.img_size // m.patch_size
    if m.mask == "block":
        if m.student != "symmetric":
            raise ConfigError("model.mask=block needs model.student=symmetric: the asymmetric student batches a fixed "
                              "number of visible patches, and block masks vary in count")
        if not 0 < m.num_mask_patches < grid * grid:
            raise ConfigError(f"model.mask=block needs model.num_mask_patches in 1..{grid * grid - 1} for the "
                              f"{grid}x{grid} grid, got {m.num_mask_patches} (the reference hides 78)")
        if m.min_mask_patches_per_block < 1:
            raise ConfigError("model.min_mask_patches_per_block must be >= 1")
    if m.student == "symmetric" and t.source == "bootstrap":
        raise ConfigError("model.student=symmetric is the pre-trained-teacher recipe: set teacher.source (hf_clip or "
                          "vit) and teacher.weights; bootstrapped teachers are built for the asymmetric student only")
    if m.layer_scale_init < 0:
        raise ConfigError("model.layer_scale_init must be >= 0 (0 = no layer scale)")
    if t.clip_target != "hidden" and t.source != "hf_clip":
        raise ConfigError("teacher.clip_target applies to teacher.source=hf_clip only")
    if t.input_size and t.source == "bootstrap":
        raise ConfigError("teacher.input_size applies to teachers from other weights (teacher.source=vit or hf_clip); "
                          "a bootstrapped teacher is the student's own encoder and reads model.img_size")
    if t.input_size < 0:
        raise ConfigError("teacher.input_size must be >= 0 (0 = model.img_size)")
    for key, value in (("teacher.precision", t.precision), ("optim.grad_reduce_dtype", cfg.optim.grad_reduce_dtype)):
        if value not in ("bf16", "fp32"):
            raise ConfigError(f"{key} must be bf16 or fp32, got '{value}'")


def _validate_data(d: DataConfig) -> None:
    """Augmentation ranges and the loader's shard interleave."""
    if len(d.crop_scale) != 2 or not 0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0:
        raise ConfigError(f"data.crop_scale must be [min, max] area fractions with 0 < min <= max <= 1 (e.g. "
                          f"[0.2, 1.0]), got {d.crop_scale}")
    if d.interpolation not in ("bicubic", "bilinear"):
        raise ConfigError(f"data.interpolation must be bicubic or bilinear, got '{d.interpolation}'")
    if not 0.0 <= d.color_jitter <= 1.0:
        raise ConfigError(f"data.color_jitter must be in [0, 1] (0 = off; the CLIP recipe uses 0.4), got {d.color_jitter}")
    if d.open_shards < 1:
        raise ConfigError(f"data.open_shards must be >= 1 (1 = one shard after another), got {d.open_shards}")


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step; error unless micro_batch x accumulation x world == global_batch."""
    o = cfg.optim
    per_step = o.micro_batch * world_size
    if o.global_batch % per_step:
        ok = [m for m in range(1, o.global_batch // world_size + 1) if o.global_batch % (m * world_size) == 0]
        raise ConfigError(
            f"optim.global_batch={o.global_batch} is not micro_batch ({o.micro_batch}) x accumulation x world size "
            f"({world_size}) for any whole accumulation. Set optim.micro_batch to one of {ok[-6:]} or change "
            f"optim.global_batch.")
    return o.global_batch // per_step


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_diff(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> dict[str, tuple[Any, Any]]:
    """{'model.depth': (12, 24), ...} for the dotted keys (or whole sections) that differ between two dicts.
    A key the old dict predates (a checkpoint from before the key existed) is not compared."""
    out = {}
    flat_old, flat_new = _flat_dict(old), _flat_dict(new)
    for k in sorted(flat_old):
        if any(k == p or k.startswith(p + ".") for p in keys) and flat_old.get(k) != flat_new.get(k):
            out[k] = (flat_old.get(k), flat_new.get(k))
    return out


def _flat_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
