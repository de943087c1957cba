"""Cortex neuron: a worker that holds models resident and serves their jobs over NATS."""
