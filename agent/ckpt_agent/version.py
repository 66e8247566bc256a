"""The agent's version, apart from the package's face so that the rooms below can name it without
importing the trainer's helper (which imports the load record)."""

__version__ = "0.1.0"
