"""Client-pattern tests: request patterns recorded from real clients (Open WebUI, Continue, Cline, the
OpenAI SDK), replayed against a running gateway with the clients' own libraries (openai, httpx)."""
