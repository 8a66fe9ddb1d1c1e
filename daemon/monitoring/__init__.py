"""What watches the running daemon: Prometheus metrics, /healthz and snapshots over HTTP, and the
process's own resources."""
