"""The shard format: schema, image decoding and view cutting, planning, writer, reader, manifest."""
