"""Build a DOMASS-like classifier as a TF1 checkpoint, the way DPAM's step 16 model is saved.

DPAM's DOMASS step restores a `tf.compat.v1` meta graph and checkpoint and reads the
tensors `input:0` (feature rows) and `output:0` (class probabilities). This script writes a
small stand-in with the same shape of interface: a two-layer MLP over 13 features with a
softmax over 2 classes, trained for a few steps on synthetic data with a fixed seed, so
the weights are not random noise. No download is involved.

    python examples/dpam_domass/build.py [--out examples/dpam_domass/models]

writes `<out>/domass/{model.ckpt.*, config.yaml}`; the config lists each file's sha256.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import yaml

from tensorfleet.core.hashing import file_sha256

FEATURES = 13
CLASSES = 2
HIDDEN = 32
HERE = Path(__file__).resolve().parent


def synthetic_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows and labels from a fixed random linear rule (a learnable stand-in)."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    rule = rng.standard_normal(FEATURES).astype(np.float32)
    labels = (features @ rule > 0).astype(np.int64)
    return features, labels


def build(out: Path, seed: int = 0, steps: int = 200) -> Path:
    """Train and save the model under `out/domass`; return that folder."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    v1 = tf.compat.v1
    model_dir = out / "domass"
    model_dir.mkdir(parents=True, exist_ok=True)
    features, labels = synthetic_data(512, seed)
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(seed)
        x = v1.placeholder(tf.float32, [None, FEATURES], name="input")
        y = v1.placeholder(tf.int64, [None], name="labels")
        w1 = v1.get_variable(
            "w1", [FEATURES, HIDDEN], initializer=v1.glorot_uniform_initializer(seed=seed)
        )
        b1 = v1.get_variable("b1", [HIDDEN], initializer=v1.zeros_initializer())
        w2 = v1.get_variable(
            "w2", [HIDDEN, CLASSES], initializer=v1.glorot_uniform_initializer(seed=seed + 1)
        )
        b2 = v1.get_variable("b2", [CLASSES], initializer=v1.zeros_initializer())
        logits = tf.matmul(tf.nn.relu(tf.matmul(x, w1) + b1), w2) + b2
        tf.nn.softmax(logits, name="output")
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        )
        train = v1.train.GradientDescentOptimizer(0.5).minimize(loss)
        saver = v1.train.Saver()
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            for _ in range(steps):
                session.run(train, {x: features, y: labels})
            saver.save(session, str(model_dir / "model.ckpt"), write_state=False)
    write_config(model_dir)
    return model_dir


def write_config(model_dir: Path) -> None:
    artifacts = {
        path.name: file_sha256(path)
        for path in sorted(model_dir.glob("model.ckpt*"))
    }
    config = {
        "name": model_dir.name,
        "backend": "tensorflow_graph",
        "description": "DOMASS-like domain-assignment classifier (TF1 checkpoint stand-in)",
        "max_batch_size": 1024,
        "model_file": "model.ckpt",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [FEATURES]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [CLASSES]}],
        "batching": {"max_queue_delay_ms": 2, "preferred_batch_sizes": [256, 1024]},
        "parameters": {
            "input_tensors": {"features": "input:0"},
            "output_tensors": {"probabilities": "output:0"},
        },
        "artifacts": artifacts,
        "warmup": [{"features": [0.0] * FEATURES}],
    }
    (model_dir / "config.yaml").write_text(
        yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=HERE / "models", help="model repository to write into"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
