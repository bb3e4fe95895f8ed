"""State stores: one interface each (profiles, step statistics, ...), Redis and in-memory implementations."""
