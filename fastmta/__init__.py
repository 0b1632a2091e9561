"""fastmta: a high-throughput outbound mail transfer agent."""
