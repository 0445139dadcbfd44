"""models.d and the nodes, typed and validated once at the edge: specs, the registry, durations."""
