"""Transfer sets: the requests table, the Arrow schema, the shard store and the transfer sources."""
