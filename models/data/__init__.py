"""Interaction data: schema, readers, validation, the synthetic generator, sharding and partitions."""
