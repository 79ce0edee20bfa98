"""Migrations of the gallery app."""
