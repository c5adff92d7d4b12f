"""Numbered schema migrations, one list per SQL backend.

A migration never changes once released: a new schema is a new number. Each runs
in its own transaction with the bump of the schema version, so a crash leaves the
store at one version or the next, never between.
"""
