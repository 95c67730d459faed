"""The documentation's code examples: every file here is shown on a page under docs/ and run by
tests/unit/test_docs_examples.py, so an example cannot drift from the code."""
