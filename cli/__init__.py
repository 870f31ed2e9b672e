"""The `vendetta` command line: talks only to the coordinator."""
