"""Hub downloads checked against the sha256 the Hub publishes for each large file (``hash_mismatches``: the
comparison, on real files; the Hub's metadata call itself needs the network, which tests do not have)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gauntlet.models import hash_mismatches


def test_a_changed_weight_file_is_named_and_files_not_downloaded_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights as published")
    (tmp_path / "model-00002.safetensors").write_bytes(b"weights changed on disk")
    published = {
        "model.safetensors": hashlib.sha256(b"weights as published").hexdigest(),
        "model-00002.safetensors": hashlib.sha256(b"weights as published, part 2").hexdigest(),
        "original/consolidated.pth": hashlib.sha256(b"not downloaded").hexdigest(),   # outside allow_patterns
    }
    assert hash_mismatches(tmp_path, published) == ["model-00002.safetensors"]
    published["model-00002.safetensors"] = hashlib.sha256(b"weights changed on disk").hexdigest()
    assert hash_mismatches(tmp_path, published) == []
