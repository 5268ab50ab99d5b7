"""Command line: the runtime's subcommand parsers and their handlers."""
