"""The HTTP face of sparkgate: OpenAI routes, the streaming proxy, errors, the CLI."""
