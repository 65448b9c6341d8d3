"""timm's Hugging Face Hub layout beside a dbot-export (checkpoint/hub.py): `local-dir:` and `hf-hub:` load what the
writers put there, with exactly `dbot_ds.load_encoder`'s weights and features; config.json is what timm's own
`save_for_hf` writes for that model; folders from before the layout, hub-only folders, `--stage` copies and
`--also-teacher` / `--which teacher` exports. A random vit_tiny_patch4 (32 px) on the CPU: no DeepSpeed, seconds."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from testkit import fake_checkpoint

SD = "model.safetensors"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def features(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(images() if x is None else x)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def local_dir(folder: Path, **kwargs):
    import timm
    return timm.create_model(f"local-dir:{folder}", pretrained=True, **{"num_classes": 0, **kwargs})


@pytest.fixture(scope="module")
def cfg():
    from dbot_ds.config import build_config
    return build_config({"schedule.stage_steps": [2, 2], "optim.precision": "fp32"})    # vit_tiny_patch4, 32 px


@pytest.fixture(scope="module")
def export_dir(cfg, tmp_path_factory) -> Path:
    """A stage encoder as the trainer writes it (write_stage_encoder): the folder `dbot-export --stage` copies."""
    from dbot_ds.checkpoint.export import write_stage_encoder
    from dbot_ds.model.vit import Encoder
    torch.manual_seed(0)
    state = Encoder(cfg.model, cfg.model.depth).state_dict()
    out = tmp_path_factory.mktemp("run") / "stage_encoders" / "stage1"
    write_stage_encoder(state, cfg, out, stage=1, step=4)
    return out


def test_local_dir_loads_the_export_as_load_encoder_does(export_dir):
    import dbot_ds
    assert sorted(p.name for p in export_dir.iterdir()) == ["config.json", "encoder.json", "encoder.safetensors", SD]
    # the weights are on disk once: model.safetensors is encoder.safetensors (a hard link)
    assert os.path.samefile(export_dir / SD, export_dir / "encoder.safetensors")
    ours = dbot_ds.load_encoder(export_dir)
    hub = local_dir(export_dir)
    assert type(hub) is type(ours) and hub.num_classes == 0
    assert same_weights(hub.state_dict(), ours.state_dict())
    got = features(hub)
    assert got.shape == (2, 65, 96) and got.dtype == torch.float32
    assert torch.equal(got, features(ours)) and torch.equal(got, dbot_ds.encode(ours, images()))
    # a new head for fine-tuning: the encoder's weights, a fresh classifier (pretrained_cfg names it)
    tuned = local_dir(export_dir, num_classes=10)
    assert tuned.head.out_features == 10 and torch.equal(features(tuned), got)


def test_config_json_fields(export_dir):
    import timm

    from dbot_ds.checkpoint.hub import EVAL_CROP_PCT, HUB_WEIGHTS
    from dbot_ds.evaluate.knn import CROP_PCT
    assert HUB_WEIGHTS == timm.models._hub.HF_SAFE_WEIGHTS_NAME and EVAL_CROP_PCT == CROP_PCT
    hub = json.loads((export_dir / "config.json").read_text())
    info = json.loads((export_dir / "encoder.json").read_text())
    assert hub["architecture"] == info["timm_arch"] == "vit_base_patch16_224"        # 32 px patch 4: generic
    assert (hub["num_classes"], hub["num_features"], hub["global_pool"]) == (0, 96, "token")
    assert info["timm_kwargs"] == dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0)
    assert hub["model_args"] == dict(info["timm_kwargs"], img_size=[32, 32], num_classes=0, in_chans=3,
                                     global_pool="token")
    pc = hub["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["fixed_input_size"] is True
    assert (pc["interpolation"], pc["crop_pct"], pc["crop_mode"]) == ("bicubic", 0.875, "center")
    assert pc["mean"] == MEAN == info["mean"] and pc["std"] == STD == info["std"]
    assert (pc["num_classes"], pc["classifier"], pc["first_conv"]) == (0, "head", "patch_embed.proj")
    assert pc["description"].startswith("dBOT student encoder trained with dbot-ds: custom ViT: width 96")
    assert "stage 1, step 4" in pc["description"]
    assert not {"architecture", "file", "source", "url", "hf_hub_id"} & set(pc)       # nothing local is published
    # timm's eval transforms from either model: the export's size, crop and normalisation
    import dbot_ds
    want = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": tuple(MEAN), "std": tuple(STD),
            "crop_pct": 0.875, "crop_mode": "center"}
    for model in (local_dir(export_dir), dbot_ds.load_encoder(export_dir)):
        got = timm.data.resolve_data_config(model=model)
        assert {k: tuple(v) if isinstance(v, list) else v for k, v in got.items()} == want      # JSON gives lists


def test_the_layout_is_what_timm_save_for_hf_writes(export_dir, tmp_path):
    """timm's own writer, on the model timm loads from the folder and on load_encoder's, writes the same
    config.json and the same tensors: the folder is a fixed point of timm's hub format."""
    import timm
    from safetensors.torch import load_file

    import dbot_ds
    config = json.loads((export_dir / "config.json").read_text())
    weights = load_file(str(export_dir / SD))
    for name, model in (("timm", local_dir(export_dir)), ("ours", dbot_ds.load_encoder(export_dir))):
        timm.models.save_for_hf(model, tmp_path / name, safe_serialization=True)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.json", SD]
        assert json.loads((tmp_path / name / "config.json").read_text()) == config, name
        assert same_weights(load_file(str(tmp_path / name / SD)), weights), name


def test_hf_hub_loads_the_uploaded_folder(export_dir, monkeypatch):
    """`upload_folder` publishes the folder's files as they are; `hf-hub:` then downloads config.json and
    model.safetensors. The download is replaced by the folder's own files (no network here)."""
    import timm
    import timm.models._hub as hub_mod

    import dbot_ds
    asked = []

    def download(repo_id, filename, revision=None, cache_dir=None, **_):
        assert repo_id == "someone/dbot-vit-tiny"
        asked.append(filename)
        if not (export_dir / filename).is_file():
            raise FileNotFoundError(filename)
        return str(export_dir / filename)
    monkeypatch.setattr(hub_mod, "hf_hub_download", download)
    model = timm.create_model("hf-hub:someone/dbot-vit-tiny", pretrained=True, num_classes=0)
    assert asked == ["config.json", SD]
    assert torch.equal(features(model), features(dbot_ds.load_encoder(export_dir)))


def test_old_folders_load_and_stage_copies_get_the_layout(export_dir, tmp_path, capsys):
    """A folder written before config.json (encoder.json + encoder.safetensors) still loads with load_encoder,
    timm alone cannot read it, and `dbot-export --stage` of such a kept stage encoder writes the layout."""
    import timm

    import dbot_ds
    from dbot_ds.checkpoint.export_cli import cli
    want = features(dbot_ds.load_encoder(export_dir))
    old = tmp_path / "run" / "stage_encoders" / "stage0"
    old.mkdir(parents=True)
    for f in ("encoder.json", "encoder.safetensors"):
        shutil.copyfile(export_dir / f, old / f)
    assert torch.equal(features(dbot_ds.load_encoder(old)), want)
    with pytest.raises(FileNotFoundError, match="config.json"):
        timm.create_model(f"local-dir:{old}", pretrained=True, num_classes=0)

    assert cli([str(tmp_path / "run"), "--stage", "0", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert f"local-dir:{tmp_path / 'e'}" in out and "wrote " + str(tmp_path / "e" / "config.json") in out
    assert torch.equal(features(local_dir(tmp_path / "e")), want)
    assert json.loads((tmp_path / "e" / "config.json").read_text()) == \
        json.loads((export_dir / "config.json").read_text())
    assert cli([str(tmp_path / "run"), "--stage", "0", "--out", str(tmp_path / "e")]) == 2     # kept unless --force
    assert "--force" in capsys.readouterr().err


def test_a_hub_only_folder_loads_with_load_encoder(export_dir, tmp_path):
    """What `snapshot_download` gives back (config.json + model.safetensors only) loads with load_encoder too."""
    import dbot_ds
    for f in ("config.json", SD):
        shutil.copyfile(export_dir / f, tmp_path / f)
    model = dbot_ds.load_encoder(tmp_path)
    assert not model.training and same_weights(model.state_dict(), dbot_ds.load_encoder(export_dir).state_dict())
    assert torch.equal(features(model), features(dbot_ds.load_encoder(export_dir)))


# ------------------------------------------------------------------------ teacher exports (dbot-export, no DeepSpeed)

def test_teacher_exports_get_the_layout_in_their_own_folder(cfg, tmp_path, monkeypatch, capsys):
    import dbot_ds
    import dbot_ds.checkpoint.export_cli as ex
    from dbot_ds.model.vit import Encoder

    def consolidate(ref):
        torch.manual_seed(2)
        return {f"encoder.{k}": v for k, v in Encoder(ref.model_cfg, ref.model_cfg.depth).state_dict().items()}
    monkeypatch.setattr(ex, "_consolidate_student", consolidate)
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoints", 4, 2, stage_end=True, lengths=(2, 2))   # the cfg fixture's
    out = tmp_path / "both"
    assert ex.cli([str(run), "--out", str(out), "--also-teacher"]) == 0, capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "config.json", "encoder.json", "encoder.safetensors", SD, "teacher", "teacher.json", "teacher.safetensors",
        "teacher/config.json", f"teacher/{SD}"]
    assert os.path.samefile(out / "teacher" / SD, out / "teacher.safetensors")

    student, teacher = dbot_ds.load_encoder(out), dbot_ds.load_encoder(out, name="teacher")
    assert torch.equal(features(local_dir(out)), features(student))
    t_hub = local_dir(out / "teacher")
    assert same_weights(t_hub.state_dict(), teacher.state_dict())
    assert torch.equal(features(t_hub), features(teacher))
    assert torch.equal(features(dbot_ds.load_encoder(out / "teacher")), features(teacher))
    assert not torch.equal(features(teacher), features(student))
    t_cfg = json.loads((out / "teacher" / "config.json").read_text())
    assert t_cfg["model_args"]["final_norm"] is False and "norm.weight" not in t_hub.state_dict()
    assert t_cfg["pretrained_cfg"]["description"].startswith("dBOT teacher encoder")
    assert json.loads((out / "config.json").read_text())["model_args"].get("final_norm", True) is True

    # existing hub files are kept unless --force
    assert ex.cli([str(run), "--out", str(out), "--also-teacher"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert ex.cli([str(run), "--out", str(out), "--also-teacher", "--force"]) == 0

    # --which teacher: the teacher alone is the folder's model, at its top
    assert ex.cli([str(run), "--which", "teacher", "--out", str(tmp_path / "t")]) == 0
    assert not (tmp_path / "t" / "teacher").exists()
    assert torch.equal(features(local_dir(tmp_path / "t")), features(teacher))


def test_a_stage_end_survives_a_hub_layout_that_timm_cannot_write(cfg, export_dir, tmp_path, monkeypatch, capsys):
    """The trainer's stage-end write keeps the encoder (the run goes on) and says how to get the layout later;
    dbot-export itself stops. No half-written layout is left beside the weights."""
    import dbot_ds
    import dbot_ds.checkpoint.hub as hub
    from dbot_ds.checkpoint.export import _write_export, write_stage_encoder
    from dbot_ds.model.vit import Encoder

    def broken(info, device="meta"):
        raise RuntimeError("a timm without save_config_for_hf")
    monkeypatch.setattr(hub, "hub_model", broken)
    torch.manual_seed(0)
    state = Encoder(cfg.model, cfg.model.depth).state_dict()
    out = tmp_path / "stage1"
    write_stage_encoder(state, cfg, out, stage=1, step=4)
    assert sorted(p.name for p in out.iterdir()) == ["encoder.json", "encoder.safetensors"]
    err = capsys.readouterr().err
    assert "hub layout" in err and "a timm without save_config_for_hf" in err and "dbot-export RUN --stage K" in err
    with pytest.raises(RuntimeError, match="save_config_for_hf"):           # dbot-export: an error
        _write_export(tmp_path / "cli", "encoder", {"w": torch.zeros(1)}, {"timm_arch": "x", "model_name": "x", "step": 0})
    monkeypatch.undo()
    assert torch.equal(features(dbot_ds.load_encoder(out)), features(dbot_ds.load_encoder(export_dir)))
