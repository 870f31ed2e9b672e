from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("vendetta")
except PackageNotFoundError:  # running from a source tree that was not installed
    VERSION = "0.0.0+src"
