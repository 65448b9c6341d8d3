"""Checks of a Config that need no DeepSpeed and no data, run once when it is built: fail before anything else."""
from __future__ import annotations

from .schema import Config, ConfigError, DataConfig, EvalConfig


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
    if cfg.run.wandb:
        _validate_wandb(cfg)


def _validate_wandb(cfg: Config) -> None:
    """run.wandb=true: the package imports (a missing or broken install fails here, before any data is read or
    DeepSpeed is built) and the project is named."""
    if not cfg.run.wandb_project:
        raise ConfigError("run.wandb=true needs run.wandb_project (a W&B project name, e.g. dbot-ds)")
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"run.wandb=true needs the wandb package ({why}): pip install -e '.[wandb]', or set "
                          "run.wandb=false") from e


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
