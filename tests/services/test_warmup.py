"""Shape buckets: batches padded to the bucket width, and the configured shapes warmed at load."""

import numpy as np
import pytest
import yaml

from tensorfleet.core.errors import InvalidArgument
from tensorfleet.services.batching.assembly import BatchAssembly
from tensorfleet.services.model_config import ModelConfig, load_config
from tensorfleet.services.validation import DecodedRequest
from tensorfleet.services.warmup import shape_inputs, warm_shapes


def config(**batching) -> ModelConfig:
    return ModelConfig.model_validate({
        "name": "m", "backend": "python", "max_batch_size": 8,
        "inputs": [{"name": "t", "datatype": "INT64", "shape": [-1], "ragged": True, "pad_value": 0},
                   {"name": "s", "datatype": "BYTES", "shape": [1]}],
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1], "ragged": True}],
        "warmup": [{"t": [5, 6, 7], "s": "ACD"}],
        "batching": batching,
    })  # fmt: skip


def decoded(length: int) -> DecodedRequest:
    t = np.arange(1, length + 1, dtype=np.int64).reshape(1, -1)
    return DecodedRequest(inputs={"t": t, "s": np.array([[b"x"]], dtype=object)}, rows=1, length=length)


def test_pad_to_bucket_pads_batches_even_of_one_request_and_cuts_outputs_back():
    padded = BatchAssembly(config(pad_to_bucket=True, length_bucket=16), [decoded(5), decoded(17)])
    merged = padded.merge()
    assert merged["t"].shape == (2, 32) and (merged["t"][0, 5:] == 0).all()
    alone = BatchAssembly(config(pad_to_bucket=True, length_bucket=16), [decoded(5)]).merge()
    assert alone["t"].shape == (1, 16)
    assert BatchAssembly(config(length_bucket=16), [decoded(5), decoded(17)]).merge()["t"].shape == (2, 17)
    split = padded.split({"y": merged["t"] * 2})
    assert [s["y"].shape for s in split] == [(1, 5), (1, 17)]


def test_shape_inputs_repeat_the_example_to_the_shape():
    batch = shape_inputs(config(warmup_shapes=[[4, 7]]), 4, 7)
    assert batch["t"].shape == (4, 7) and batch["t"][0].tolist() == [5, 6, 7, 5, 6, 7, 5]
    assert batch["s"].shape == (4, 1)  # not ragged: as the example gave it


class Recorder:
    def __init__(self):
        self.shapes = []

    def predict(self, inputs, outputs=None):
        self.shapes.append(inputs["t"].shape)
        return {}


def test_every_configured_shape_is_run_once():
    recorder = Recorder()
    assert warm_shapes(config(warmup_shapes=[[1, 32], [8, 64]]), recorder) == 2
    assert recorder.shapes == [(1, 32), (8, 64)]


@pytest.mark.parametrize(("extra", "message"), [
    ({"warmup": []}, "needs a `warmup` example"),
    ({"batching": {"warmup_shapes": [[16, 32]]}}, "exceed max_batch_size"),
    ({"batching": {"warmup_shapes": [[0, 32]]}}, "both at least 1"),
])  # fmt: skip
def test_bad_warmup_shapes_are_clear_load_errors(tmp_path, extra, message):
    raw = config(warmup_shapes=[[2, 32]]).model_dump(by_alias=True)
    raw.update(extra)
    if "warmup" in extra:
        raw["batching"]["warmup_shapes"] = [[2, 32]]
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(InvalidArgument, match=message):
        load_config(folder)
