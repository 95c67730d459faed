"""Business logic, one module per flow, free of broker code."""
