"""What an unpinned model source costs per run: fetch_model re-hashing a local folder, against reading it.

    python benchmarks/fetch_rehash.py [--gib 1] [--repeats 3]

A local folder (or object-store prefix, or hub branch) is not pinned, so every run resolves it again and
``fetch_model`` re-checks and re-hashes it (tasks/models.py: the fetch cache would otherwise hide changed
weights behind an unchanged path). This writes a model folder of ``--gib`` GiB of safetensors weights
and times, in the same invocation:

* the baseline: reading every byte of the folder once (what any loader pays at least);
* ``fetch_model`` on it: layout check, safetensors integrity check and the sha256 of every file.

The table gives seconds, GB/s and the ratio to the baseline; multiply by a model's size for its cost
(a 7B model in bf16 is ~14 GB). The first read warms the page cache, so both rows read from memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_model_folder(root: Path, gib: float) -> int:
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 1024}))
    per_shard = 256 << 20  # 256 MiB shards, as hub checkpoints are sharded
    total, i = int(gib * (1 << 30)), 0
    while i * per_shard < total:
        n = min(per_shard, total - i * per_shard) // 2
        save_file({f"layer{i}.weight": torch.randn(n, dtype=torch.float32).to(torch.bfloat16)},
                  str(root / f"model-{i:05d}.safetensors"))
        i += 1
    return sum(p.stat().st_size for p in root.iterdir())


def read_all(root: Path) -> None:
    for p in sorted(root.iterdir()):
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def fetch(root: Path) -> None:
    from gauntlet.config.model import ModelSpec
    from gauntlet.models import fetch_model

    fetch_model(ModelSpec(source=str(root)))


def timed(fn, root: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(root)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the model folder in GiB (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per row; the median is shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gauntlet-rehash-") as tmp:
        root = Path(tmp) / "model"
        size = write_model_folder(root, args.gib)
        read_all(root)  # warm the page cache for both rows
        baseline = timed(read_all, root, args.repeats)
        rehash = timed(fetch, root, args.repeats)
    gb = size / 1e9
    print(f"\nmodel folder: {gb:.2f} GB of safetensors, median of {args.repeats}\n")
    print("| what | seconds | GB/s | ratio to read |")
    print("|---|---|---|---|")
    print(f"| read every byte (baseline) | {baseline:.2f} | {gb / baseline:.2f} | 1.00 |")
    print(f"| fetch_model: check + sha256 | {rehash:.2f} | {gb / rehash:.2f} | {rehash / baseline:.2f} |")
    print(f"\n≈ {14 / (gb / rehash):.0f} s per run for a 14 GB (7B bf16) local folder on this machine")


if __name__ == "__main__":
    main()
