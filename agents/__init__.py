"""Faust agents: thin glue from topics to the worker's roles. No decisions here."""
