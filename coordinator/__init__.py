"""The coordinator: owns nodes, workspaces and their desired vs observed state."""
