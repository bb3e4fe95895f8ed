"""Segments: declarative rule segments (and, later, online clustering)."""
