"""The fleet: what the servers serve, where they are (discovery), local server processes, SLURM."""
