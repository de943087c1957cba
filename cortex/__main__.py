"""``python -m cortex``: same as the ``cortex`` console script."""

from cortex.cli import main

main()
