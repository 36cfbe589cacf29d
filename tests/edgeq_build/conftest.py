import pytest


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """One tiny_cnn W8A8 build for Android and iOS 18 (with latency), shared by the tests that only read it."""
    from edgeq.pipeline.build import build

    out = tmp_path_factory.mktemp("build") / "dist"
    return build("tiny_cnn", targets=("android", "ios18"), output=out, progress=False, say=lambda s: None)
