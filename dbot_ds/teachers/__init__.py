"""Teachers: where the frozen teacher lives (replicated, or a ZeRO-3 engine without an optimizer; placement.py)
and where its weights come from other than the bootstrap: timm / MAE / dBOT files (sources.py), CLIP towers
(clip.py), and the resizing both need so the teacher's token grid equals the student's (resize.py)."""
