"""Benchmark clients: `servelm bench serve` (online, any OpenAI-compatible server)."""
