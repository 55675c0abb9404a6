"""The gRPC edges: thin servicers that turn messages into domain objects and back."""
