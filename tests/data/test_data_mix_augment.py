"""Class mixing from class-sorted shards (data.open_shards), augmentation as config (data.crop_scale, hflip,
interpolation, color_jitter), and `dbot-bench data` on shards holding a corrupt JPEG."""
from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dbot_ds.bench.cli import cli
from dbot_ds.bench.mix import classes_of, mean_classes_per_batch, write_class_sorted_shards
from dbot_ds.config import ConfigError, DataConfig, load_config
from dbot_ds.data.augment import Augment, _Decoder
from dbot_ds.data.epochs import DEFAULT_OPEN_SHARDS, Geometry, StreamState, feed_order, interleaved

# ------------------------------------------------------------------------------------------ interleave

def test_interleaved_round_robin_refills_slots_and_closes_what_it_opened():
    streams = [range(0, 3), range(10, 11), range(20, 22), range(30, 32)]
    assert list(interleaved(streams, 1)) == [0, 1, 2, 10, 20, 21, 30, 31]          # 1 = one after another
    assert list(interleaved(streams, 2)) == [0, 10, 1, 20, 2, 21, 30, 31]          # 10 ends: 20.. takes its slot
    closed = []

    def stream(i):
        try:
            yield from range(i * 10, i * 10 + 5)
        finally:
            closed.append(i)
    it = interleaved((stream(i) for i in range(5)), 3)
    assert list(itertools.islice(it, 4)) == [0, 10, 20, 1]
    it.close()
    assert sorted(closed) == [0, 1, 2]                  # the open ones closed, the unopened never started


def test_feed_order_is_the_slice_order_with_one_open_shard():
    pieces = [(3, 0, 4), (1, 2, 5), (1, 6, 8), (0, 0, 2)]    # (1, ..) pieces are one run: one pass over shard 1
    n = sum(b - a for _, a, b in pieces)
    assert feed_order(pieces, 1) == list(range(n))
    assert sorted(feed_order(pieces, 8)) == list(range(n))
    assert feed_order(pieces, 8)[:3] == [0, 4, 9]            # one sample of each run in turn


def test_geometry_lists_without_open_shards_mean_one_shard_at_a_time():
    assert Geometry.from_list([2, 4, 32, 1000]).open_shards == 1               # checkpoints from before
    g = Geometry(2, 4, 32, 1000)
    assert g.open_shards == DEFAULT_OPEN_SHARDS == DataConfig().open_shards
    assert Geometry.from_list(g.as_list()) == g
    state = StreamState.fresh(g)
    assert StreamState.from_dict(json.loads(json.dumps(state.to_dict()))).geometry == g


# --------------------------------------------------------------------------------------- class mixing

@pytest.fixture(scope="module")
def sorted_shards(tmp_path_factory):
    """8 shards of one class each, larger than the shuffle buffer (as 1300 ImageNet images vs 1000)."""
    return write_class_sorted_shards(tmp_path_factory.mktemp("mix"), classes=8, per_class=48)


@pytest.mark.parametrize("resampled", [True, False])
def test_batches_from_class_sorted_shards_are_class_mixed(sorted_shards, resampled):
    args = dict(classes=8, batch=16, batches=6, workers=0, shuffle_buffer=32, resampled=resampled)
    mixed = mean_classes_per_batch(sorted_shards, open_shards=DEFAULT_OPEN_SHARDS, **args)
    one_at_a_time = mean_classes_per_batch(sorted_shards, open_shards=1, **args)    # the order before
    assert one_at_a_time < 3 <= 6 <= mixed, (one_at_a_time, mixed)


def test_classes_of_recovers_the_class_after_crop_and_flip(sorted_shards):
    from dbot_ds.data.stream import build_train_loader
    loader = build_train_loader(sorted_shards, img_size=8, micro_batch=16, num_workers=0, seed=0, rank=0,
                                world_size=1, resampled=False, shuffle_buffer=1, open_shards=1)
    images, _ = next(iter(loader))
    assert classes_of(images, 8).tolist() == [classes_of(images, 8)[0].item()] * 16   # first shard: one class


# --------------------------------------------------------------------------------------- augmentation

def photo(size=(96, 64)) -> dict:
    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return {"__key__": "x", "png": buf.getvalue()}


def test_augment_keys_reach_the_decoder_and_stay_deterministic_per_image():
    sample = photo()
    plain = _Decoder(32)(sample, seed=5)
    jitter = _Decoder(32, Augment(color_jitter=0.4))
    assert torch.equal(jitter(sample, seed=5), jitter(sample, seed=5))            # seeded per image
    assert not torch.equal(jitter(sample, seed=5), jitter(sample, seed=6))
    assert not torch.equal(jitter(sample, seed=5), plain) and jitter(sample, seed=5).dtype == torch.uint8
    outer = torch.get_rng_state()
    jitter(sample, seed=7)
    assert torch.equal(torch.get_rng_state(), outer)                              # caller's RNG untouched
    whole = Augment(crop_scale=(1.0, 1.0), hflip=False)
    flips = {tuple(_Decoder(32, whole._replace(hflip=True))(sample, seed=s)[0, 0, :3].tolist()) for s in range(8)}
    assert len(flips) == 2                                                        # flipped or not
    kept = {tuple(_Decoder(32, whole)(sample, seed=s)[0, 0, :3].tolist()) for s in range(8)}
    assert len(kept) == 1                                                         # hflip off: never flipped
    assert not torch.equal(_Decoder(32, whole._replace(interpolation="bilinear"))(sample, seed=1),
                           _Decoder(32, whole)(sample, seed=1))
    assert _Decoder(32, Augment(crop_scale=(0.4, 1.0))).draft_side < _Decoder(32).draft_side


def _v2_pipeline(size, aug):
    """The student's augmentation as torchvision's v2 Compose (what _Decoder's draws must equal)."""
    from torchvision.transforms import v2

    from dbot_ds.data.augment import INTERPOLATIONS
    steps = [v2.ColorJitter(*(aug.color_jitter,) * 3)] if aug.color_jitter else []
    steps.append(v2.RandomResizedCrop(size, scale=aug.crop_scale, interpolation=INTERPOLATIONS[aug.interpolation]))
    return v2.Compose(steps + ([v2.RandomHorizontalFlip()] if aug.hflip else []))


@pytest.mark.parametrize("aug", [Augment(), Augment(color_jitter=0.4, crop_scale=(0.4, 1.0)),
                                 Augment(hflip=False, interpolation="bilinear")])
def test_teacher_view_is_cut_from_the_same_crop_and_leaves_the_student_view_unchanged(aug):
    """teacher.input_size != model.img_size: one crop box, resized to each size from the crop's own pixels (the
    reference's second_input_size), flipped together; the student's view is bit-identical to v2's pipeline."""
    from torchvision.transforms import v2

    from dbot_ds.data.augment import Views
    img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(photo()["png"])))).permute(2, 0, 1)
    one, two = _Decoder(32, aug), _Decoder(32, aug, teacher_size=28)
    for seed in range(12):
        torch.manual_seed(seed)
        want = _v2_pipeline(32, aug)(img)
        torch.manual_seed(seed)
        student = one._augment(img)
        torch.manual_seed(seed)
        views = two._augment(img)
        assert isinstance(views, Views) and torch.equal(student, want) and torch.equal(views.student, want)
        assert views.teacher.shape == (3, 28, 28) and views.teacher.dtype == torch.uint8
        # the same box, resized straight to 28 px (bicubic), flipped as the student's view was
        torch.manual_seed(seed)
        img_j = v2.ColorJitter(*(aug.color_jitter,) * 3)(img) if aug.color_jitter else img
        box = v2.RandomResizedCrop(32, scale=aug.crop_scale).make_params([img_j])
        flip = aug.hflip and bool(torch.rand(1) < 0.5)
        direct = v2.functional.resized_crop(img_j, **box, size=[28, 28],
                                            interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(views.teacher, v2.functional.horizontal_flip(direct) if flip else direct)
        twice = v2.functional.resize(views.student, [28, 28], interpolation=v2.InterpolationMode.BICUBIC,
                                     antialias=True)
        assert not torch.equal(views.teacher, twice)          # not a resize of the student's view
    assert _Decoder(32, aug, teacher_size=32)._augment(img).dim() == 3     # same size: one view
    assert two.draft_side == one.draft_side and _Decoder(32, aug, teacher_size=64).draft_side > one.draft_side


def test_teacher_view_matches_pil_bicubic_of_the_crop_as_the_reference_makes_it():
    """On a real photo (scikit-image's astronaut), the 196 px teacher view is within 0.01/255 (mean pixel
    difference) of PIL's bicubic resize of the same crop, the reference's second_input_size (0.2/255 for a crop
    enlarged to 196 px). Resizing the 224 px student view again, as earlier versions did, is about 1/255 away."""
    from skimage import data
    from torchvision.transforms import v2
    photo_hwc = data.astronaut()
    img, pil = torch.from_numpy(photo_hwc).permute(2, 0, 1), Image.fromarray(photo_hwc)
    decoder = _Decoder(224, Augment(hflip=False), teacher_size=196)
    ours, twice = [], []
    for seed in range(10):
        torch.manual_seed(seed)
        views = decoder._augment(img)
        torch.manual_seed(seed)
        box = v2.RandomResizedCrop(224, scale=(0.2, 1.0)).make_params([img])
        crop = pil.crop((box["left"], box["top"], box["left"] + box["width"], box["top"] + box["height"]))
        ref = torch.from_numpy(np.asarray(crop.resize((196, 196), Image.BICUBIC))).permute(2, 0, 1).float()
        resized = torch.nn.functional.interpolate(views.student[None].float(), size=(196, 196), mode="bicubic",
                                                  align_corners=False, antialias=True)[0]
        ours.append((views.teacher.float() - ref).abs().mean().item())
        twice.append((resized - ref).abs().mean().item())
    assert sorted(ours)[5] < 0.01 and max(ours) < 0.25 and min(twice) > 0.5, (ours, twice)


def test_loader_batches_carry_both_views(sorted_shards):
    from dbot_ds.data.augment import Views
    from dbot_ds.data.stream import build_train_loader
    kw = dict(img_size=8, micro_batch=4, num_workers=0, seed=0, rank=0, world_size=1, shuffle_buffer=1)
    plain, _ = next(iter(build_train_loader(sorted_shards, **kw)))
    views, info = next(iter(build_train_loader(sorted_shards, **kw, teacher_size=12)))
    assert isinstance(views, Views) and views.student.shape == (4, 3, 8, 8) and views.teacher.shape == (4, 3, 12, 12)
    assert torch.equal(views.student, plain) and info.skipped == 0


@pytest.mark.parametrize("override,message", [
    ("data.crop_scale=[0.5,0.3]", "0 < min <= max <= 1"), ("data.crop_scale=[0,1]", "0 < min"),
    ("data.crop_scale=[0.2]", "[min, max]"), ("data.interpolation=nearest", "bicubic or bilinear"),
    ("data.color_jitter=40", "[0, 1]"), ("data.open_shards=0", ">= 1")])
def test_augment_config_is_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(overrides=["schedule.stage_steps=[10]", override])
    with pytest.raises(ValueError):
        Augment(crop_scale=(0.5, 0.3)).check()


def test_clip_presets_use_the_reference_augmentation():
    for name in ("vit_b_clip", "vit_l_clip", "vit_h_clip"):
        d = load_config(preset=name).data
        assert (d.crop_scale, d.color_jitter, d.hflip, d.interpolation) == ([0.4, 1.0], 0.4, True, "bicubic")
    d = load_config(preset="vit_b").data
    assert (d.crop_scale, d.color_jitter) == ([0.2, 1.0], 0.0)


# ------------------------------------------------------------------------------------- corrupt images

def test_data_bench_survives_a_corrupt_jpeg_and_reports_skips(tmp_path, capsys):
    good = []
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (48, 40), (40 * i, 90, 200)).save(buf, "JPEG", quality=90)
        good.append(buf.getvalue())
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as sink:
        for i, data in enumerate(good + [good[0][: len(good[0]) // 2]]):       # the 4th is truncated
            sink.write({"__key__": f"{i:04d}", "jpg": data, "cls": i % 2})
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"num_samples": 4, "shards": [{"name": "shard-000000.tar", "num_samples": 4}]}))
    argv = ["data", "--shards", str(tmp_path / "shard-000000.tar"), "--workers", "0", "--steps", "6",
            "--batch", "2", "--img-size", "16", "--warmup", "0", "--skip-normalize", "--color-jitter", "0.4",
            "--crop-scale", "0.4", "1"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["skipped"] >= 1 and record["baseline_skipped"] >= 1, record
    assert record["augment"]["color_jitter"] == 0.4 and record["augment"]["crop_scale"] == [0.4, 1.0]
    assert "unreadable images skipped" in out
