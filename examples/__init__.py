"""A small demo pipeline: scoring each client's leads in chunks with a checkpoint cursor."""
