import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # coreml_models


@pytest.fixture(scope="session", autouse=True)
def _coremltools_quiet():
    """Import coremltools once, quietly (it prints warnings about optional frontends on import)."""
    from edgeq._quiet import quiet

    with quiet():
        import coremltools  # noqa: F401
