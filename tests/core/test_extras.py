"""Every "install X" message names the pyproject extra that brings X (issue 29)."""

from __future__ import annotations

import pytest

from tensorfleet.coordinator.io.objectstore import ObjectStoreError, filesystem
from tensorfleet.core.extras import EXTRAS, install_hint
from tests.coordinator.helpers import REPO_ROOT


def test_every_named_extra_exists_and_brings_its_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (extra, package) in EXTRAS.items():
        assert extra in extras, f"{module}: no extra '{extra}' in pyproject.toml"
        names = [requirement.split("=")[0].split(">")[0].split("<")[0].split("[")[0] for requirement in extras[extra]]
        assert package in names, f"extra '{extra}' does not install {package} (it has {names})"


def test_a_gs_url_without_gcsfs_names_the_gcs_extra():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ObjectStoreError) as error:
        filesystem("gs://bucket/cells.h5ad")
    assert "pip install 'tensorfleet[gcs]'" in str(error.value) and "gcsfs" in str(error.value)


def test_hints_name_the_extra():
    assert install_hint("h5py") == "pip install 'tensorfleet[io]' (brings h5py)"
    assert install_hint("torch.nn") == "pip install 'tensorfleet[torch]' (brings torch)"
    assert install_hint("s3fs") == "pip install 'tensorfleet[s3]' (brings s3fs)"
