"""Engines in Docker containers: the only part of sparkgate that talks to a Docker daemon (hosts,
containers, groups of containers spanning nodes, the runtime, and a node's memory read through Docker)."""
