"""Pure topology code: graphs, mixing weights, spectral gap, manifest schema and validation."""
