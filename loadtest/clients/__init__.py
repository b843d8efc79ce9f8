"""Load clients: the streaming load generator and its keep-alive HTTP client."""
