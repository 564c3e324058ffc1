"""Adapters to training frameworks (Hugging Face ``Trainer`` / ``accelerate``)."""
