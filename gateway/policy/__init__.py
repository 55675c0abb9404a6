"""Sharing policy: the engine and field filter, field paths, transforms."""
