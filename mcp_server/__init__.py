"""`vendetta mcp`: a Model Context Protocol server for AI coding agents, a client of the
coordinator over gRPC (never its code): over stdio with the local user's socket (or
VENDETTA_URL and a token), or over streamable HTTP behind TLS where each caller's
token goes with every call it makes, so the coordinator holds it to its scope."""
