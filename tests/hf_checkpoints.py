"""Tiny Hugging Face checkpoints written by transformers' own save_pretrained, fixed seeds.

Nothing is downloaded: each builder makes a random model of 2 layers and hidden 32, with its
tokenizer, and saves both in the layout the library writes (config.json, model.safetensors,
tokenizer files), as a scientist's checkpoint folder would be. `fake_hub_cache` lays a folder
out as huggingface_hub lays out its cache (models--org--name/{blobs,refs,snapshots}), so a
repo id resolves offline. `reference_embed` is the in-process comparison: the same model and
tokenizer, the same pooling, on the rows given, padded together.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install 'tensorfleet[hf]')")
torch = pytest.importorskip("torch")

HIDDEN = 32
ESM_LETTERS = "LAGVSERTIDPKQNFYMHWCXBUZO.-"
GENES = [f"GENE{i}" for i in range(40)]


def save_esm2(folder: Path, seed: int = 0, masked_lm: bool = True) -> Path:
    """An ESM-2 shaped EsmForMaskedLM (rotary, token dropout) with the ESM alphabet."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["<cls>", "<pad>", "<eos>", "<unk>", *ESM_LETTERS, "<null_1>", "<mask>"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.EsmTokenizer(str(folder / "vocab.txt"))
    config = transformers.EsmConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=130, pad_token_id=1, mask_token_id=vocab.index("<mask>"),
        position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
    )
    torch.manual_seed(seed)
    model = (transformers.EsmForMaskedLM if masked_lm else transformers.EsmModel)(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_gene_bert(folder: Path, seed: int = 1) -> Path:
    """A BERT over gene tokens (Geneformer-style): each whitespace-separated gene name is a token."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *GENES]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=False)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
    )
    torch.manual_seed(seed)
    transformers.BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_dna_roberta(folder: Path, seed: int = 2) -> Path:
    """A RoBERTa over DNA with a byte-level BPE tokenizer trained here on a few sequences."""
    from tokenizers import ByteLevelBPETokenizer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    corpus = ["".join(rng.choice(list("ACGT"), size=60)) for _ in range(50)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    from tokenizers.processors import RobertaProcessing

    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
    )
    config = transformers.RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    transformers.RobertaModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fake_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """Copy `folder` into `cache` as huggingface_hub stores a download: blobs named by their
    hash, a snapshot of symlinks under a commit id, and refs/<revision> naming that commit.
    Returns the commit id."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, repo / "blobs" / digest)
        link = snapshot / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


def load_reference(folder: Path, cls: str = "AutoModel"):
    """The checkpoint and its tokenizer loaded in this process, as a user's script would."""
    model = getattr(transformers, cls).from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer


def reference_embed(model, tokenizer, texts: list[str], max_length: int | None = None) -> dict[str, np.ndarray]:
    """mean (real non-special tokens), cls, last and per-token states of `texts` padded together.

    One intra-op thread, as the servers in the tests run (`--threads 1`): a CPU kernel may
    split its sums differently with more threads, and bitwise comparisons need the same split."""
    encoded = tokenizer(texts, padding=True, return_special_tokens_mask=True, return_tensors="pt",
                        truncation=max_length is not None, max_length=max_length)
    real = ((encoded["attention_mask"] == 1) & (encoded["special_tokens_mask"] == 0)).float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            hidden = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
    finally:
        torch.set_num_threads(threads)
    hidden = hidden.float()
    mean = (hidden * real.unsqueeze(-1)).sum(dim=1) / real.sum(dim=1, keepdim=True)
    last = encoded["attention_mask"].sum(dim=1) - 1
    per_token = [hidden[row, real[row].bool()].numpy() for row in range(len(texts))]
    return {"mean": mean.numpy(), "cls": hidden[:, 0].numpy(), "last": hidden[torch.arange(len(texts)), last].numpy(),
            "per_token": per_token}


def model_folder(repository: Path, name: str, transformers_section: dict, outputs: list[str],
                 max_batch_size: int = 16, batching: dict | None = None, input_spec: dict | None = None,
                 **extra) -> Path:
    """A model folder whose config.yaml serves a checkpoint through backend `transformers`."""
    import yaml

    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for output in outputs:
        if output == "length":
            specs.append({"name": "length", "datatype": "INT32", "shape": []})
        elif output in ("per_token", "hidden_states"):
            specs.append({"name": output, "datatype": "FP32", "shape": [-1, HIDDEN], "ragged": True})
        else:
            specs.append({"name": output, "datatype": "FP32", "shape": [HIDDEN]})
    doc = {
        "name": name, "backend": "transformers", "max_batch_size": max_batch_size,
        "transformers": transformers_section,
        "inputs": [input_spec or {"name": "sequence", "datatype": "BYTES", "shape": []}],
        "outputs": specs,
        "batching": batching or {"max_queue_delay_ms": 2},
        **extra,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder
