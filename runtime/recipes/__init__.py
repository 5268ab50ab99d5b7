"""Recipes: the crash-safe recipe store and enrollment of golden (and labelled defective) parts."""
