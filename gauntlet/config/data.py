"""The ``data:`` section: DVC-tracked JSONL files and the checks they must pass before training."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

from gauntlet.config.base import Strict, check_inside, dvc_produces, resolve, usable


class DataChecksSpec(Strict):
    """Checks on the pulled data before any training (gauntlet/data/checks.py)."""

    max_duplicate_rate: float = Field(0.2, ge=0, le=1)
    max_prompt_tokens_p95: int | None = Field(None, gt=0, description="default: train.max_seq_len")
    max_contamination_rate: float = Field(0.0, ge=0, le=1,
                                          description="fraction of eval items found in the training data")
    max_length_psi: float | None = Field(None, gt=0, description="drift against the champion's training data: largest "
                                                                "PSI of prompt or response lengths (0.25: a large "
                                                                "shift), above the PSI as many rows of the champion's "
                                                                "own data reach by chance; None: measured and logged only")
    max_row_change: float | None = Field(None, gt=0, description="drift: largest relative change of the training row "
                                                                "count against the champion's data (0.5 = ±50%)")


class DataSpec(Strict):
    """Versioned data: paths of DVC-tracked JSONL files, relative to the DVC repo root."""

    repo: str = Field(".", description="DVC repository root, relative to the project root")
    train: str
    validation: str
    eval: str | None = Field(None, description="evaluation items produced by the same data version (optional)")
    reproducible: bool = Field(True, description="reproduce the DVC stage when the remote lacks the data")
    remote: str | None = Field(None, description="DVC remote name (default: the repo's default remote)")
    required_fields: tuple[str, ...] | None = Field(
        None, description="string fields every train/validation row must have; default: by the file's layout "
                          "(alpaca: instruction, input, output; chat: a messages/conversations list of turns)")
    max_row_bytes: int = Field(1 << 20, gt=0, description="a longer JSONL row is an error, not a memory spike")
    checks: DataChecksSpec = DataChecksSpec()

    @field_validator("repo")
    @classmethod
    def _repo_is_a_dvc_repo(cls, v: str, info: ValidationInfo) -> str:
        """The project itself, or another DVC repository (a data registry); never just any folder."""
        repo = resolve(v, info, inside=False)
        try:
            resolve(v, info)
        except ValueError:
            if not (repo / ".dvc").is_dir():
                raise ValueError(f"data.repo {str(repo)!r} is outside the project and is not a DVC repository (no "
                                 ".dvc folder). Fix: point data.repo at a DVC repository, or leave it '.' and "
                                 "track the data in this project") from None
        return v

    @field_validator("train", "validation", "eval")
    @classmethod
    def _tracked(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if "repo" not in info.data:   # the repo itself was refused: its files cannot be checked
            return v
        repo = resolve(info.data["repo"], info, inside=False)   # vetted by _repo_is_a_dvc_repo
        if info.context:   # read from a file: untrusted (see resolve)
            check_inside(repo / v, repo)
        if not usable(repo / v).exists() and not dvc_produces(repo, v):
            raise ValueError(
                f"{v!r} does not exist under {str(repo)!r} and no dvc.yaml stage or .dvc file produces it"
            )
        return v

