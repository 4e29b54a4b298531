"""Local stand-ins for external services, speaking their documented wire formats."""
