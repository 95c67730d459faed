"""docs/writing-a-flow.md: a third flow, declared once and tested in memory."""
