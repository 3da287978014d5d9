"""Model backends, one file each, registered in one place."""
