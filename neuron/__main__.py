"""``python -m neuron``: same as the ``neuron`` console script."""

from neuron.cli import main

main()
