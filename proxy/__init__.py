"""euroute: an EU-compliant routing proxy for LLM traffic."""

__version__ = "0.1.0"
