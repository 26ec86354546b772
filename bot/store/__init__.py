"""Conversation history and per-channel settings in SQL (SQLite embedded, PostgreSQL at scale)."""
