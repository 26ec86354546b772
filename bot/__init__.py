"""hermes-bot: a multi-persona chatbot framework for Discord."""

__version__ = "0.1.0"
