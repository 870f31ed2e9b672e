"""The Docker provider: environments are labelled containers on the node's Docker engine."""

from providers.docker.provider import DockerProvider

__all__ = ["DockerProvider"]
