"""What the user asked for: the environment, the spec and the flags' values parsed into frozen
dataclasses, refusing anything unexpected. Imports nothing of the agent but errors."""
