"""A model's declared feature list (config.yaml `features`): checked at load, part of the fingerprint."""

from __future__ import annotations

import pytest

from tensorfleet.core.errors import InvalidArgument
from tensorfleet.services.model_config import load_config, read_features
from tensorfleet.services.repository.repository import verify_artifacts

CONFIG = """name: m
backend: python
max_batch_size: 4
inputs:
  - {name: x, datatype: FP32, shape: [3]}
outputs:
  - {name: y, datatype: FP32, shape: [3]}
features: {file: %s}
"""


def model_dir(tmp_path, names: str, file: str = "genes.txt"):
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(CONFIG % file)
    (folder / "genes.txt").write_text(names)
    return folder


def test_the_list_is_read_in_order_for_the_only_input(tmp_path):
    folder = model_dir(tmp_path, "A\nB\n\nC\n")
    config = load_config(folder)
    assert config.features.input == "x"
    assert read_features(folder, config) == ["A", "B", "C"]


@pytest.mark.parametrize(
    ("names", "file", "problem"),
    [("A\nB\n", "genes.txt", "2 feature names, but input 'x' is 3 wide"),
     ("A\nB\nA\n", "genes.txt", "feature names repeat"),
     ("A\nB\nC\n", "../outside.txt", "is not a file in the model folder")],
)
def test_a_list_that_does_not_fit_is_a_load_error(tmp_path, names, file, problem):
    (tmp_path / "outside.txt").write_text("A\nB\nC\n")
    folder = model_dir(tmp_path, names, file)
    with pytest.raises(InvalidArgument, match=problem):
        read_features(folder, load_config(folder))


def test_the_fingerprint_changes_with_the_list(tmp_path):
    folder = model_dir(tmp_path, "A\nB\nC\n")
    before = verify_artifacts(folder, load_config(folder))
    (folder / "genes.txt").write_text("C\nB\nA\n")
    assert verify_artifacts(folder, load_config(folder)) != before
