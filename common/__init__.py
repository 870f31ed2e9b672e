"""Pieces every vendetta component shares: the error tree, names, paths, project config."""
