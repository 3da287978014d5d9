"""One model over one input: adapt, plan, manifest, dispatch, merge, progress and status."""
