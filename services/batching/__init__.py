"""Dynamic batching: one batcher per model (batcher.py) merges queued requests into batches, and
batch assembly (assembly.py) stacks and pads their inputs and splits the outputs back per request."""
