"""Recipes: run cards shipped inside the package. Each ``NAME.py`` has ``get_config(arg) -> Config`` and a
docstring with its launch command, hardware, wall time and measured accuracy; ``flexivit train NAME``
(or ``NAME:ARG``) loads it by name, and a path to a file of your own works the same way."""
