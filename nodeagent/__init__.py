"""The node agent: drives the providers on one node, behind a 0600 unix socket."""
