"""Personalization triggers: configuration (:mod:`.config`) and pure decisions (:mod:`.decide`)."""
