"""Evaluation: bits-per-byte, CORE, ChatCORE and reports."""
