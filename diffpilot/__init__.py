"""diffpilot: generative control policies for robots and self-driving cars."""

__version__ = "0.1.0"
