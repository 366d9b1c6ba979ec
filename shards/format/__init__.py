"""The shard format: schema, image decoding and view cutting, views, planning, writer, tar
samples, reader, manifest and verification."""
