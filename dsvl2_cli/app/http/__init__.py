"""HTTP: the OpenAI-compatible server (dsvl2 serve) and the client behind --server."""
