"""The .h5ad writer's own anndata elements (io/writers/anndata_elements.py), read back by
anndata itself."""

from __future__ import annotations

import h5py
import numpy as np
from anndata.io import read_elem

from tensorfleet.coordinator.io.writers.anndata_elements import write_array, write_mostly_empty_text


def test_a_mostly_empty_text_column_reads_back_with_its_texts_and_empty_strings(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as file:
        write_mostly_empty_text(file, "none_failed", 5, {})
        write_mostly_empty_text(file, "two_failed", 5, {1: "INTERNAL: boom", 4: "bad row ü"})
        write_mostly_empty_text(file, "no_rows", 0, {})
        write_array(file, "written", np.array(["", "INTERNAL: boom", "", "", "bad row ü"]))
    with h5py.File(tmp_path / "a.h5", "r") as file:
        assert list(read_elem(file["none_failed"])) == [""] * 5
        assert list(read_elem(file["two_failed"])) == ["", "INTERNAL: boom", "", "", "bad row ü"]
        assert list(read_elem(file["two_failed"])) == list(read_elem(file["written"]))
        assert len(read_elem(file["no_rows"])) == 0
        assert file["none_failed"].attrs["encoding-type"] == "string-array"
