"""vzero_fast: a lean trainer for vision-language models that improve themselves without labels.

One process per GPU; roles (Questioner, Solver, ...) train each other with GRPO. See README.md.

`vzero_fast.kernels` lives in the top-level kernels/ folder (pyproject's package-dir), which an install
maps. From a source checkout without an install (`PYTHONPATH=.`, or a `pip install --target` dir that
./vzero_fast shadows) the mapping is missing, so the checkout's kernels/ is added to this package's search
path: the subpackage imports either way. The dispatch.py check keeps an unrelated top-level `kernels`
package (there is one on PyPI) out.
"""

import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "dispatch.py")):
    __path__.append(_root)  # noqa: F821 -- a package's __path__ exists at import time
