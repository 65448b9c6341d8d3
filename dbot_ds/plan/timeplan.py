"""How long a dBOT recipe takes on W GPUs: compute from model FLOPs (or a measured step) plus the ZeRO
communication that compute does not hide. Pure arithmetic on numbers the caller supplies; `dbot-plan --time`
feeds it from a preset, the architecture and a `dbot-bench step` JSON or a card and an assumed MFU.

Units: seconds, bytes, FLOP/s; bandwidths in GB/s (1e9 bytes/s) per GPU and per direction.

Compute per optimizer step = (global batch / W) images x model FLOPs per image / achieved FLOP/s per GPU. The
achieved rate is taken to be the same at every micro-batch size and in every stage (stage 0's depth-0 teacher
only changes the FLOPs per image).

Communication, per GPU, as DeepSpeed 0.19 runs ds_configs/zero2.json and zero3.json (bf16 weights, so bf16
gradients and bf16 collectives; a buffer of N elements is 2 N bytes):
- ZeRO-2 reduce-scatters the gradients at EVERY micro-step, not only at the accumulation boundary: it keeps
  only its own gradient partition, so each backward's gradients are reduced as they are produced
  (`reduce_ready_partitions_and_remove_grads` in runtime/zero/stage_1_and_2.py). That overlaps with the backward
  (overlap_comm). After the optimizer step the updated bf16 parameters are all-gathered once; nothing runs
  beside that gather.
- ZeRO-3 all-gathers the parameters for each micro-step's forward and again for its backward (prefetched, so
  they overlap with compute) and reduce-scatters the gradients; the optimizer step gathers nothing.
- A teacher placed with ZeRO-3 (`teacher.placement=zero3`) is all-gathered for its forward at every micro-step.
A ring reduce-scatter or all-gather makes each GPU send (W - 1) / W of the buffer. Inside one node all of it
goes over NVLink. Across nodes NCCL runs one ring per NIC (rail-optimised nodes, one NIC per GPU), so a ring
leaves each node once: 1/g of a GPU's traffic crosses its NIC, the rest stays on NVLink, and the pipelined ring
runs at the slower of the two. Put differently, the nodes' aggregate NIC bandwidth (g x per-GPU) is the bus
bandwidth, as nccl-tests measures it on multi-node DGX systems.

Of the communication that can overlap, a fraction `overlap` is hidden behind compute (never more than the
compute itself). Latency per collective, stragglers, data loading, checkpoints and the stage swap are not
modelled, so the prediction is a lower bound on the step time.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

SECONDS_PER_DAY = 86400.0
BF16_BYTES = 2


@dataclass(frozen=True)
class Fabric:
    """The interconnect, GB/s per GPU per direction (line rates; pass nccl-tests' bus bandwidth to be exact)."""
    nvlink_gbps: float = 300.0        # intra-node: A100 NVLink3 300, H100/H200 NVLink4 450
    inter_gbps: float = 25.0          # inter-node per GPU: 200 Gb/s HDR = 25, 400 Gb/s NDR = 50
    gpus_per_node: int = 8


# DGX / HGX nodes: 8 GPUs on NVSwitch, one InfiniBand NIC per GPU.
FABRICS = {"A100": Fabric(300.0, 25.0), "H100": Fabric(450.0, 50.0), "H200": Fabric(450.0, 50.0)}

# Half of the communication that may overlap is taken as hidden. ZeRO-2's last reduce bucket (200 M elements,
# about 30% of ViT-H's 657 M) can only start when the backward ends, and NCCL kernels share the SMs and memory
# bandwidth with the backward they hide behind, so ~70% is the ceiling; half is the middle of [0, 0.7].
# A `dbot-bench step` on several GPUs measures the real figure.
DEFAULT_OVERLAP = 0.5


@dataclass(frozen=True)
class Collective:
    """One kind of collective in an optimizer step."""
    name: str
    nbytes: float                     # the whole buffer, bytes (each GPU sends (W - 1) / W of it)
    per_micro_step: bool              # True: once per micro-step (x accumulation); False: once per optimizer step
    overlappable: bool                # can run beside compute (overlap_comm, ZeRO-3 prefetch)


@dataclass(frozen=True)
class Stage:
    """One stage of the recipe."""
    steps: int                        # optimizer steps
    teacher_depth: int
    flops_per_image: float            # model FLOPs: teacher forward + student forward and backward
    teacher_params: int               # elements; gathered per micro-step only when the teacher is partitioned


@dataclass(frozen=True)
class Recipe:
    """What is trained, in what batches, under which ZeRO stage."""
    global_batch: int                 # images per optimizer step, over all GPUs
    max_micro_batch: int              # images per GPU per forward; shrunk when W x micro > global batch
    stages: tuple[Stage, ...]
    student_params: int               # elements: encoder, decoder, predictor
    zero: int = 2                     # 2 or 3
    teacher_partitioned: bool = False  # teacher.placement=zero3


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step of one stage on `world` GPUs."""
    world: int
    micro_batch: int
    accum: int
    compute_s: float
    comm_s: float                     # all communication
    exposed_comm_s: float             # the part compute does not hide

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s


def micro_and_accum(global_batch: int, world: int, max_micro: int) -> tuple[int, int]:
    """(micro-batch, accumulation) with micro x accum x world == global_batch: the largest micro-batch up to
    `max_micro` that divides each GPU's share. 4096 images: 8 GPUs -> (128, 4), 256 GPUs -> (16, 1)."""
    if world <= 0 or global_batch % world:
        raise ValueError(f"a global batch of {global_batch} images does not split evenly over {world} GPUs")
    per_gpu = global_batch // world
    micro = max(m for m in range(1, min(max_micro, per_gpu) + 1) if per_gpu % m == 0)
    return micro, per_gpu // micro


def collective_seconds(nbytes: float, world: int, fabric: Fabric) -> float:
    """Seconds of one ring reduce-scatter or all-gather of an `nbytes` buffer over `world` GPUs."""
    if world <= 1:
        return 0.0
    sent = nbytes * (world - 1) / world                      # bytes each GPU sends
    g = fabric.gpus_per_node
    if world <= g:
        return sent / (fabric.nvlink_gbps * 1e9)
    # one ring per NIC: 1 hop in g leaves the node; NVLink and NIC transfers are pipelined, the slower one wins
    return max(sent * (g - 1) / g / (fabric.nvlink_gbps * 1e9), sent / g / (fabric.inter_gbps * 1e9))


def collectives(recipe: Recipe, stage: Stage) -> list[Collective]:
    """The collectives of one optimizer step of `stage` (see the module docstring)."""
    model = BF16_BYTES * recipe.student_params
    if recipe.zero == 2:
        out = [Collective("grad reduce-scatter", model, True, True),
               Collective("param all-gather", model, False, False)]
    elif recipe.zero == 3:
        out = [Collective("param all-gather (forward)", model, True, True),
               Collective("param all-gather (backward)", model, True, True),
               Collective("grad reduce-scatter", model, True, True)]
    else:
        raise ValueError(f"the time model covers ZeRO-2 and ZeRO-3, not ZeRO-{recipe.zero}")
    if recipe.teacher_partitioned and stage.teacher_params:
        out.append(Collective("teacher all-gather", BF16_BYTES * stage.teacher_params, True, True))
    return out


def comm_seconds(colls: list[Collective], accum: int, world: int, fabric: Fabric, overlap: float,
                 compute_s: float) -> tuple[float, float]:
    """(all communication seconds per optimizer step of `accum` micro-steps, the exposed part): `overlap` of the
    overlappable part is hidden, but never more than the compute it hides behind."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap is a fraction in [0, 1], got {overlap}")
    timed = [((accum if c.per_micro_step else 1) * collective_seconds(c.nbytes, world, fabric), c.overlappable)
             for c in colls]
    total = sum(t for t, _ in timed)
    hidden = min(overlap * sum(t for t, ok in timed if ok), compute_s)
    return total, total - hidden


def step_time(recipe: Recipe, stage: Stage, world: int, fabric: Fabric, flops_per_s: float,
              overlap: float = DEFAULT_OVERLAP) -> StepTime:
    """One optimizer step of `stage` on `world` GPUs, each achieving `flops_per_s` model FLOP/s."""
    micro, accum = micro_and_accum(recipe.global_batch, world, recipe.max_micro_batch)
    compute = micro * accum * stage.flops_per_image / flops_per_s
    comm, exposed = comm_seconds(collectives(recipe, stage), accum, world, fabric, overlap, compute)
    return StepTime(world, micro, accum, compute, comm, exposed)


def recipe_days(steps: list[StepTime], recipe: Recipe) -> float:
    """Wall-clock days of the whole recipe: every stage's steps at that stage's step time."""
    return sum(st.steps * t.step_s for st, t in zip(recipe.stages, steps)) / SECONDS_PER_DAY


def scaling_table(recipe: Recipe, worlds: list[int], fabric: Fabric, flops_per_s: float,
                  overlap: float = DEFAULT_OVERLAP) -> list[dict]:
    """Per world size: micro-batch, accumulation, each stage's step split, img/s, days for the recipe, and
    scaling efficiency (per-GPU throughput relative to the smallest world size)."""
    rows = []
    for w in sorted(worlds):
        steps = [step_time(recipe, st, w, fabric, flops_per_s, overlap) for st in recipe.stages]
        rows.append({"world": w, "micro_batch": steps[0].micro_batch, "accum": steps[0].accum,
                     "days": recipe_days(steps, recipe),
                     "compute_days": recipe_days([replace(t, exposed_comm_s=0.0) for t in steps], recipe),
                     "stages": [{"stage": i, "teacher_depth": st.teacher_depth, "steps": st.steps,
                                 "compute_s": t.compute_s, "comm_s": t.comm_s, "exposed_comm_s": t.exposed_comm_s,
                                 "step_s": t.step_s, "img_per_s": recipe.global_batch / t.step_s}
                                for i, (st, t) in enumerate(zip(recipe.stages, steps))]})
    base = rows[0]
    for r in rows:
        r["efficiency"] = base["days"] * base["world"] / (r["days"] * r["world"])
        for s, b in zip(r["stages"], base["stages"]):
            s["efficiency"] = (s["img_per_s"] / r["world"]) / (b["img_per_s"] / base["world"])
    return rows


def flops_per_s_from_card(peak_tflops: float, mfu: float) -> float:
    """Achieved model FLOP/s per GPU: peak dense bf16 TFLOP/s x MFU."""
    return peak_tflops * 1e12 * mfu


def flops_per_s_from_bench(bench: dict) -> float:
    """Achieved model FLOP/s per GPU of a `dbot-bench step --json` result: img/s per GPU x model FLOPs per image
    (the bench's own teacher depth), so it carries over to a stage with another teacher depth."""
    return bench["img_per_s_per_gpu"] * bench["gflops_per_image"] * 1e9


# ----------------------------------------------------------------------------------------------------------
# A published figure to check the model against.

# NVIDIA NeMo Framework user guide, Multimodal Models > Vision Transformer > Performance
# (https://docs.nvidia.com/nemo-framework/user-guide/latest/MultimodalModels/VisionLanguageFoundation/Vit/Perf.html):
# ViT g/14 training on DGX A100 80GB nodes (8 GPUs, NVSwitch, 8 x 200 Gb/s HDR InfiniBand per node), samples/s on
# 1, 2, 4, 8, 16 nodes; 10644 / 693 = 15.35x on 16 nodes. The g/14 model is 1011 M params (hidden 1408, 40
# layers, FFN 6144) with 64 images per GPU in NeMo's curated config.
NEMO_VIT_G14_IMG_PER_S = {1: 693.0, 2: 1347.0, 4: 2642.0, 8: 5454.0, 16: 10644.0}
NEMO_VIT_G14_SPEEDUP_16_NODES = 15.35
NEMO_VIT_G14_PARAMS = 1_011_000_000
NEMO_VIT_G14_MICRO_BATCH = 64


def nemo_vit_g14_speedup(nodes: int, overlap: float = DEFAULT_OVERLAP, fabric: Fabric = FABRICS["A100"]) -> float:
    """Our prediction of NeMo's ViT-g/14 speedup on `nodes` DGX A100 nodes over 1 node.

    Compute per step is the measured 1-node step minus the communication the model puts into it; the traffic is
    our ZeRO-2 model's (Megatron's distributed optimizer moves the same bytes: reduce-scatter the bf16
    gradients, all-gather the bf16 parameters). 64 images per GPU and no accumulation at every size: NeMo's
    4096-image global batch cannot keep 64 per GPU on 16 nodes, so the benchmark grows the batch with the GPUs."""
    g = fabric.gpus_per_node
    stage = Stage(steps=1, teacher_depth=0, flops_per_image=1.0, teacher_params=0)

    def recipe(world: int) -> Recipe:
        return Recipe(NEMO_VIT_G14_MICRO_BATCH * world, NEMO_VIT_G14_MICRO_BATCH, (stage,), NEMO_VIT_G14_PARAMS)

    def exposed(world: int, compute_s: float) -> float:
        return comm_seconds(collectives(recipe(world), stage), 1, world, fabric, overlap, compute_s)[1]

    one_node_s = NEMO_VIT_G14_MICRO_BATCH * g / NEMO_VIT_G14_IMG_PER_S[1]        # measured step, s
    compute_s = one_node_s - exposed(g, one_node_s)
    return nodes * one_node_s / (compute_s + exposed(nodes * g, compute_s))
