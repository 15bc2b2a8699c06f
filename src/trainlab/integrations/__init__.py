"""Bridges from trainlab's methods to other libraries' training loops (Hugging Face Trainer)."""
