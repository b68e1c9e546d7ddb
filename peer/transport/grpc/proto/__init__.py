"""Generated gRPC stubs (see scripts/generate_protos.py); do not edit."""
