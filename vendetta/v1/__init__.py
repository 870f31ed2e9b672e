"""Generated from protos/vendetta/v1 by `make protos`. Do not edit."""
