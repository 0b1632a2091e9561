"""fastmta: a high-throughput outbound mail transfer agent."""

__version__ = "0.1.0"
