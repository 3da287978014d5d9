"""TensorFlow SavedModel and TF1 checkpoint models served for real, compared with in-process TF.

TensorFlow is an optional extra, so every test that needs it skips without it; the one test
that proves a server without TensorFlow still starts runs everywhere (it hides TensorFlow
from the server process instead of needing it gone).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from tensorfleet.client import InferenceClient
from tests.serving import REPO_ROOT, running_server

TOLERANCE = 1e-5  # max abs difference between served and in-process outputs (same CPU kernels)
INSTALL_HINT = "tensorflow is not installed: pip install 'tensorfleet[tensorflow]'"  # the extra, named (issue 29)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checksums(model_dir: Path) -> dict[str, str]:
    """sha256 of every file in the model folder except config.yaml, by relative path."""
    return {
        str(path.relative_to(model_dir)): _sha(path)
        for path in sorted(model_dir.rglob("*"))
        if path.is_file() and path.name != "config.yaml"
    }


def _write_config(model_dir: Path, **fields) -> None:
    config = {"name": model_dir.name, "max_batch_size": 16, **fields}
    config.setdefault("artifacts", _checksums(model_dir))
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))


FEATURES = [
    {"name": "features", "datatype": "FP32", "shape": [8]},
    {"name": "scale", "datatype": "FP32", "shape": [1]},
]
KERAS_OUTPUTS = [
    {"name": "hidden", "datatype": "FP32", "shape": [4]},
    {"name": "probs", "datatype": "FP32", "shape": [3]},
]
KERAS_WARMUP = [{"features": [0.0] * 8, "scale": [1.0]}]


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


def _keras_model():
    import keras

    keras.utils.set_random_seed(0)
    features = keras.Input(shape=(8,), name="features")
    scale = keras.Input(shape=(1,), name="scale")
    hidden = keras.layers.Dense(4, activation="tanh")(features)
    scaled = keras.layers.Multiply(name="hidden")([hidden, scale])
    probs = keras.layers.Dense(3, activation="softmax", name="probs")(hidden)
    return keras.Model({"features": features, "scale": scale}, {"hidden": scaled, "probs": probs})


class GraphMlp:
    """A TF1-style softmax MLP (the DOMASS stand-in) kept open in its own session."""

    def __init__(self, tf, prefix: Path) -> None:
        v1 = tf.compat.v1
        self.graph = tf.Graph()
        with self.graph.as_default():
            v1.set_random_seed(3)
            self.x = v1.placeholder(tf.float32, [None, 6], name="x")
            self.keep = v1.placeholder(tf.float32, [], name="keep_prob")
            w1 = v1.get_variable("w1", [6, 16], initializer=v1.glorot_uniform_initializer(seed=3))
            w2 = v1.get_variable("w2", [16, 3], initializer=v1.glorot_uniform_initializer(seed=4))
            hidden = tf.nn.dropout(tf.nn.relu(tf.matmul(self.x, w1)), rate=1.0 - self.keep)
            self.probs = tf.nn.softmax(tf.matmul(hidden, w2))  # default name: Softmax:0
            self.session = v1.Session(graph=self.graph)
            self.session.run(v1.global_variables_initializer())
            v1.train.Saver().save(self.session, str(prefix), write_state=False)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(self.probs, {self.x: x, self.keep: 1.0})


def _export_oom_model(tf, path: Path) -> None:
    """y = 2x; a batch of more than 4 rows asks for 1 PiB, which no allocator grants."""

    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
        def serve(self, x):
            rows = tf.shape(x, out_type=tf.int64)[0]
            size = tf.where(rows > 4, tf.constant(2**48, tf.int64), tf.constant(1, tf.int64))
            return {"y": x * 2.0 + tf.reduce_sum(tf.zeros(tf.reshape(size, [1]))) * 0.0}

    module = Doubler()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def _load_example_builder():
    spec = importlib.util.spec_from_file_location(
        "domass_build", REPO_ROOT / "examples/dpam_domass/build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def repository(tf, tmp_path_factory) -> Iterator[tuple[Path, dict]]:
    repo = tmp_path_factory.mktemp("tf_repo")
    models: dict = {}

    keras_model = _keras_model()
    (repo / "keras_sm").mkdir()
    keras_model.export(str(repo / "keras_sm" / "saved_model"), verbose=False)
    _write_config(
        repo / "keras_sm",
        backend="tensorflow",
        inputs=FEATURES,
        outputs=KERAS_OUTPUTS,
        warmup=KERAS_WARMUP,
    )
    models["keras_sm"] = keras_model

    (repo / "tf1_mlp").mkdir()
    graph_model = GraphMlp(tf, repo / "tf1_mlp" / "model.ckpt")
    _write_config(
        repo / "tf1_mlp",
        backend="tensorflow_graph",
        model_file="model.ckpt",
        inputs=[{"name": "rows", "datatype": "FP32", "shape": [6]}],
        outputs=[{"name": "probabilities", "datatype": "FP32", "shape": [3]}],
        parameters={
            "input_tensors": {"rows": "x:0"},
            "output_tensors": {"probabilities": "Softmax:0"},
            "constant_feeds": {"keep_prob:0": 1.0},
        },
        warmup=[{"rows": [0.0] * 6}],
    )
    models["tf1_mlp"] = graph_model

    builder = _load_example_builder()
    builder.build(repo, seed=0, steps=20)  # the example's own script writes repo/domass
    models["domass"] = builder

    (repo / "oom_sm").mkdir()
    _export_oom_model(tf, repo / "oom_sm" / "saved_model")
    _write_config(
        repo / "oom_sm",
        backend="tensorflow",
        inputs=[{"name": "x", "datatype": "FP32", "shape": [1]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [1]}],
        batching={"max_queue_delay_ms": 50},
    )

    # Models that must fail to load, each for one clear reason, without stopping the others.
    shutil.copytree(repo / "keras_sm" / "saved_model", repo / "broken_sm" / "saved_model")
    (repo / "broken_sm" / "saved_model" / "saved_model.pb").write_bytes(b"not a protobuf at all")
    _write_config(repo / "broken_sm", backend="tensorflow", inputs=FEATURES, outputs=KERAS_OUTPUTS)

    shutil.copytree(repo / "keras_sm" / "saved_model", repo / "wrong_output" / "saved_model")
    _write_config(
        repo / "wrong_output",
        backend="tensorflow",
        inputs=FEATURES,
        outputs=[{"name": "logits", "datatype": "FP32", "shape": [3]}],
    )

    shutil.copytree(repo / "keras_sm" / "saved_model", repo / "keras_bf16" / "saved_model")
    _write_config(
        repo / "keras_bf16",
        backend="tensorflow",
        precision="bf16",
        inputs=FEATURES,
        outputs=KERAS_OUTPUTS,
    )

    shutil.copytree(
        repo / "tf1_mlp", repo / "tf1_typo", ignore=shutil.ignore_patterns("config.yaml")
    )
    _write_config(
        repo / "tf1_typo",
        backend="tensorflow_graph",
        model_file="model.ckpt",
        inputs=[{"name": "rows", "datatype": "FP32", "shape": [6]}],
        outputs=[{"name": "probabilities", "datatype": "FP32", "shape": [3]}],
        parameters={
            "input_tensors": {"rows": "x:0"},
            "output_tensors": {"probabilities": "Softmaxx:0"},
        },
    )
    yield repo, models
    graph_model.session.close()


@pytest.fixture(scope="module")
def server(repository):
    repo, _ = repository
    with running_server(repo) as process:
        yield process


def test_keras_savedmodel_outputs_equal_in_process_keras(repository, server):
    _, models = repository
    rng = np.random.default_rng(1)
    features = rng.standard_normal((5, 8)).astype(np.float32)
    scale = rng.random((5, 1)).astype(np.float32)
    expected = models["keras_sm"]({"features": features, "scale": scale})
    with InferenceClient(server.address) as client:
        out = client.infer("keras_sm", {"features": features, "scale": scale})
        assert client.model_config("keras_sm").backend == "tensorflow"
    for name in ("hidden", "probs"):
        assert out[name].dtype == np.float32
        assert np.max(np.abs(out[name] - np.asarray(expected[name]))) <= TOLERANCE


def test_tf1_checkpoint_batches_equal_in_process_session(repository, server):
    _, models = repository
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((rows, 6)).astype(np.float32) for rows in (1, 3, 7, 2, 5, 16)]
    with InferenceClient(server.address) as client:
        results = list(client.stream("tf1_mlp", [{"rows": b} for b in batches], window=6))
    for batch, out in zip(batches, results, strict=True):
        expected = models["tf1_mlp"](batch)
        assert out["probabilities"].shape == (len(batch), 3)
        assert np.max(np.abs(out["probabilities"] - expected)) <= TOLERANCE


def test_the_domass_example_serves_what_its_graph_computes(tf, repository, server):
    repo, models = repository
    features, _ = models["domass"].synthetic_data(40, seed=9)
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as session:
        v1.train.import_meta_graph(str(repo / "domass" / "model.ckpt.meta")).restore(
            session, str(repo / "domass" / "model.ckpt")
        )
        expected = session.run("output:0", {"input:0": features})
    with InferenceClient(server.address) as client:
        out = client.infer("domass", {"features": features})
    assert np.max(np.abs(out["probabilities"] - expected)) <= TOLERANCE
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)


def test_resource_exhausted_halves_the_batch(server):
    x = np.arange(8, dtype=np.float32).reshape(8, 1)
    with InferenceClient(server.address) as client:
        out = client.infer("oom_sm", {"x": x})
    np.testing.assert_array_equal(out["y"], 2 * x)
    assert "oom_sm: out of memory at 8 rows; halving" in server.log()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("broken_sm", "cannot load SavedModel"),
        (
            "wrong_output",
            "outputs ['logits'] are not among the signature 'serving_default' outputs ['hidden', 'probs']",
        ),
        ("keras_bf16", "precision bf16 is not supported by backend 'tensorflow'"),
        ("tf1_typo", "'probabilities' maps to tensor 'Softmaxx:0', which the graph lacks"),
    ],
)
def test_a_bad_model_is_a_clear_load_error_and_the_others_keep_serving(server, name, reason):
    with InferenceClient(server.address) as client:
        index = {m.name: m for m in client.repository_index()}
        assert index[name].state == "UNAVAILABLE"
        assert reason in index[name].reason
        assert index["keras_sm"].state == "READY" and index["tf1_mlp"].state == "READY"
        out = client.infer("tf1_mlp", {"rows": np.zeros((2, 6), np.float32)})
        assert out["probabilities"].shape == (2, 3)
    assert f"model {name} failed to load" in server.log()


def test_a_tf_server_and_a_torch_server_side_by_side(repository, server, tmp_path):
    torch = pytest.importorskip("torch")
    _, models = repository
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4).eval()
    (tmp_path / "linear").mkdir()
    torch.jit.save(torch.jit.script(linear), str(tmp_path / "linear" / "model.pt"))
    _write_config(
        tmp_path / "linear",
        backend="torchscript",
        inputs=[{"name": "x", "datatype": "FP32", "shape": [8]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [4]}],
    )
    rng = np.random.default_rng(4)
    features = rng.standard_normal((6, 8)).astype(np.float32)
    scale = np.ones((6, 1), np.float32)
    with torch.inference_mode():
        torch_expected = linear(torch.from_numpy(features)).numpy()
    tf_expected = np.asarray(models["keras_sm"]({"features": features, "scale": scale})["hidden"])

    def ask(address: str, model: str, inputs: dict) -> dict:
        with InferenceClient(address) as client:
            return client.infer(model, inputs)

    with running_server(tmp_path) as torch_server, ThreadPoolExecutor(2) as pool:
        assert torch_server.pid != server.pid
        tf_reply = pool.submit(
            ask, server.address, "keras_sm", {"features": features, "scale": scale}
        )
        torch_reply = pool.submit(ask, torch_server.address, "linear", {"x": features})
        assert np.max(np.abs(tf_reply.result()["hidden"] - tf_expected)) <= TOLERANCE
        assert np.max(np.abs(torch_reply.result()["y"] - torch_expected)) <= TOLERANCE


def test_without_tensorflow_the_model_fails_to_load_and_the_server_serves_the_rest(tmp_path):
    """Runs with or without TensorFlow installed: a shadow package makes `import tensorflow` fail."""
    shadow = tmp_path / "shadow" / "tensorflow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'tensorflow'\")\n")
    repo = tmp_path / "repo"
    (repo / "tf_model" / "saved_model").mkdir(parents=True)
    (repo / "tf_model" / "saved_model" / "saved_model.pb").write_bytes(b"\x00")
    _write_config(repo / "tf_model", backend="tensorflow", inputs=FEATURES, outputs=KERAS_OUTPUTS)
    (repo / "echo").mkdir()
    (repo / "echo" / "model.py").write_text(
        "class Model:\n"
        "    def load(self, context):\n        pass\n"
        "    def predict(self, inputs):\n        return {'y': inputs['x'] * 3}\n"
    )
    _write_config(
        repo / "echo",
        backend="python",
        inputs=[{"name": "x", "datatype": "FP32", "shape": [2]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [2]}],
    )
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    with (
        running_server(repo, env={"PYTHONPATH": path}) as srv,
        InferenceClient(srv.address) as client,
    ):
        index = {m.name: m for m in client.repository_index()}
        assert index["tf_model"].state == "UNAVAILABLE"
        assert INSTALL_HINT in index["tf_model"].reason
        out = client.infer("echo", {"x": np.ones((2, 2), np.float32)})
    np.testing.assert_array_equal(out["y"], np.full((2, 2), 3, np.float32))


class _FakeConfig:
    """Records what the backend asks of `tf.config`, to check GPU placement without a GPU."""

    def __init__(self, gpus: list[str], started: bool = False) -> None:
        self.gpus, self.started = gpus, started
        self.visible: list[str] = list(gpus)
        self.growth: list[str] = []
        self.experimental = self

    def list_physical_devices(self, kind: str) -> list[str]:
        return list(self.gpus)

    def get_visible_devices(self, kind: str) -> list[str]:
        return list(self.visible)

    def set_visible_devices(self, devices: list[str], kind: str) -> None:
        if self.started:
            raise RuntimeError("Visible devices cannot be modified after being initialized")
        self.visible = list(devices)

    def set_memory_growth(self, device: str, enable: bool) -> None:
        self.growth.append(device)


class _FakeTf:
    def __init__(self, config: _FakeConfig) -> None:
        self.config = config


@pytest.mark.parametrize(
    ("device", "visible", "growth", "tf_device"),
    [
        ("cpu", [], [], "/CPU:0"),
        ("cuda:0", ["gpu0"], ["gpu0"], "/GPU:0"),
        ("cuda:1", ["gpu1"], ["gpu1"], "/GPU:0"),
    ],
)
def test_device_placement_shows_tf_only_the_servers_gpu_with_memory_growth(
    device, visible, growth, tf_device
):
    from tensorfleet.services.backends.tf_common import configure_device

    config = _FakeConfig(["gpu0", "gpu1"])
    assert configure_device(_FakeTf(config), device) == tf_device
    assert config.visible == visible
    assert config.growth == growth


def test_device_placement_errors_are_clear():
    from tensorfleet.core.errors import FailedPrecondition
    from tensorfleet.services.backends.tf_common import configure_device

    with pytest.raises(FailedPrecondition, match="cuda:2: TensorFlow sees 2 GPU"):
        configure_device(_FakeTf(_FakeConfig(["gpu0", "gpu1"])), "cuda:2")
    with pytest.raises(FailedPrecondition, match="tensorflow-cpu has no GPU support"):
        configure_device(_FakeTf(_FakeConfig([])), "cuda:0")
    started = _FakeConfig(["gpu0", "gpu1"], started=True)  # TF already runs with both GPUs visible
    with pytest.raises(FailedPrecondition, match="cannot place TensorFlow on cuda:1"):
        configure_device(_FakeTf(started), "cuda:1")
    started.visible = ["gpu1"]  # ... or already runs on exactly the wanted GPU: nothing to change
    assert configure_device(_FakeTf(started), "cuda:1") == "/GPU:0"
