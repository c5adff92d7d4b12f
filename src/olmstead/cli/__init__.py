"""Operator commands: ``olmstead demo`` (more to come: doctor, repair, store tools)."""
