"""thali's built-in plugins, one concept per module. They use the same hooks as third-party plugins."""
