"""Images in: the webdataset stream (stream.py) over one shard's raw samples with skip and stall accounting
(shard_reader.py; remote.py for http/`pipe:` shards), decoding and augmentation (augment.py), exact epochs
(epochs.py), resolving `data.shards` into a sized dataset (dataset.py), shard names and manifest.json
(manifest.py), and the writers behind the `dbot-shards` CLI (shards.py): generated shapes (synthetic.py),
digits (digits.py), ImageNet folders and tars (shard_writer.py). Importable without DeepSpeed."""
