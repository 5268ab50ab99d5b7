"""Explain: the LLM's explanations of verdicts, off the reject path."""
