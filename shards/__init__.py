"""The shards and what surrounds them, each in its own room.

- ``format/``: the shard format: schema, image decoding and view cutting, planning, writer,
  reader, manifest, verification.
- ``storage/``: where bytes live: local files and object storage through one set of calls, and
  writes that appear whole or not at all.
- ``inputs/``: what stage one labels: ImageFolder trees, WebDataset tars, the embedded digits.
- ``specs``: inputs and outputs as users name them, light enough for the configurations.
"""
