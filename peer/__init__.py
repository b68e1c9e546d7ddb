"""The peer process: gRPC exchange engine, optimizers, training loop, metrics, checkpoints."""
