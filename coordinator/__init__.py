"""tensorfleet coordinator: jobs, readers, planner, dispatcher, checkpoints, writers."""
