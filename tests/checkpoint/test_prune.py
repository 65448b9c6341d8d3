"""Pruning periodic checkpoints: renamed out of the tag namespace before deletion, so a kill mid-delete never
leaves a tag with COMPLETE but missing files; leftovers of an interrupted prune are finished next time."""
import json

from dbot_ds.checkpoint.store import complete_tags, prune


def test_prune_keeps_stage_ends_and_the_newest_and_finishes_interrupted_ones(tmp_path):
    for step, stage_end in [(1, False), (2, True), (3, False), (4, False), (5, False)]:
        tag = tmp_path / f"step{step:08d}"
        tag.mkdir()
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
        (tag / "COMPLETE").write_text(json.dumps({"stage_end": stage_end}))
    (tmp_path / "step00000001.universal").mkdir()           # a cached universal copy goes with its tag
    (tmp_path / ".pruned-step00000000").mkdir()             # a prune killed mid-delete
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000002", "step00000004", "step00000005"]
    assert [t for _, t in complete_tags(tmp_path)] == ["step00000002", "step00000004", "step00000005"]
