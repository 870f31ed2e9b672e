"""Generated code only: see protos/. Do not edit."""
