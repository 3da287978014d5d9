"""The long-lived coordinator service: its gRPC API, job lifecycle, own state and dashboard."""
