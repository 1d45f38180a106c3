"""Training configs shipped with pyens (installed as ``pyens.configs``; ``--config NAME``)."""
