"""vzero_fast: a lean trainer for vision-language models that improve themselves without labels.

One process per GPU; roles (Questioner, Solver, ...) train each other with GRPO. See README.md.
"""

__version__ = "0.1.0"
