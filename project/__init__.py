"""The project around the package: where its files live (checkout, data, weights, model repository, cache) and the
README sections generated from result JSON. Used by training, deployment and the benchmark; the edge client needs
none of it."""
