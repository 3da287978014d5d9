"""The GPU kit: wheels for the GPU machine and the one script that proves and measures the GPU path."""
