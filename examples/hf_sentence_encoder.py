"""A user task around a Hugging Face model: a local pretrained encoder, dict inputs, embedding distillation.

``task: {name: examples.hf_sentence_encoder:task, args: {model_dir: /path/to/model}}``. Any local
``AutoModel`` directory works (nothing is downloaded: ``HF_HUB_OFFLINE=1``); by default the packaged
all-MiniLM-L6-v2. The model is used as it is (``pretrained=True`` with ``teacher.epochs: 0``), students
are distilled to its embeddings, and the score is the cosine similarity of a student's embeddings to
the teacher's on held-out sentences (higher is better; the teacher scores 1).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from autocompress.models.hf import SentenceEncoder
from autocompress.tasks import Task
from autocompress.tasks.minilm import generate_sentences, model_path


class Sentences(Dataset):
    """Tokenized sentences; the target is the teacher's embedding (computed once)."""

    def __init__(self, encoded: dict, targets: torch.Tensor) -> None:
        self.encoded, self.targets = encoded, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return {
            "input_ids": self.encoded["input_ids"][i],
            "attention_mask": self.encoded["attention_mask"][i],
        }, self.targets[i]


def cosine(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cosine_similarity(outputs, targets, dim=-1).mean().item()


def task(model_dir: str | None = None, sentences: int = 300, max_length: int = 24) -> Task:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_dir or model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def build() -> nn.Module:
        return SentenceEncoder(AutoModel.from_pretrained(path, attn_implementation="eager")).eval()

    teacher = build()
    splits = []
    for seed in range(3):
        text, _ = generate_sentences(sentences, mix=0.5, seed=100 + seed)
        encoded = tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            targets = teacher(encoded["input_ids"], encoded["attention_mask"])
        splits.append(Sentences(encoded, targets))
    return Task(
        name="hf-sentence-encoder",
        build_model=build,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        loss=None,  # distillation only: the fine-tune pulls students to the teacher's embeddings
        metric=cosine,
        metric_name="cosine",
        output_kind="embedding",
        pretrained=True,
        finetune_defaults={"optimizer": "adamw", "lr": 5e-5, "warmup": 0.1},
    )
