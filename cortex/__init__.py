"""Cortex gateway: OpenAI/Anthropic HTTP in front of a NATS bus of neurons. Never imports torch."""
