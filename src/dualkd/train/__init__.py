"""Training: the one loop (`loop`), the engine (`engine`, the only file that knows accelerate), batch sources,
checkpoints, optimizer/schedule, telemetry and metric logging."""
