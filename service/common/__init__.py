"""What every engine shares and the runtime relies on: error types and step outputs. Imports nothing above it."""
