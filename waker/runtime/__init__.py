"""Runtimes run an engine somewhere (a local process, a container, a remote endpoint)."""
