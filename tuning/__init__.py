"""Everything on the driver: experiment files, search, tracking, the CLI."""
