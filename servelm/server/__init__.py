"""The OpenAI-compatible HTTP server (`servelm serve`) and the terminal chat (`servelm chat`)."""
