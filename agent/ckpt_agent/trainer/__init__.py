"""Starting the training command: exec'd in the agent's place, or as a child in its own process
group when signals would otherwise be lost (a shell, PID 1, the sidecar beside it)."""
