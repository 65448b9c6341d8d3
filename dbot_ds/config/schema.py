"""The typed config tree of a dBOT run: one dataclass per section, the architectures as literal dicts.

Precedence (lowest first): dataclass defaults < the architecture named by `model.arch` < the YAML file
(`--preset` or `--config`) < `key=value` overrides from the command line (load.py). Checks that need no
DeepSpeed and no data are in validate.py. The resolved config is written into the run folder as `config.yaml`
and stored in every checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

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
                                       # hf_clip (transformers CLIP vision tower folder): see dbot_ds/teachers/
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
    input_size: int = 0                # vit / hf_clip: pixels of the teacher's own view (the loader resizes the
                                       # student's crop to it, bicubic) so its token grid equals the student's;
                                       # 0 = model.img_size. E.g. 196
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
    wandb: bool = False                # Weights & Biases (the `wandb` extra), rank 0: the scalars of metrics.jsonl and
                                       # the resolved config; offline (`wandb sync` later) unless an API key is set
    wandb_project: str = "dbot-ds"     # W&B project
    wandb_name: str = ""               # W&B run name; "": the run folder's name
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
