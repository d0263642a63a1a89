"""What an export wrote: its format, where it is, and the sha256 of every file (for the model card and DVC)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergelib.io.hashing import sha256_file


@dataclass(frozen=True)
class ExportArtifact:
    """One export: `kind` is safetensors or gguf, `variant` its dtype (or int8) or GGUF type."""

    kind: str
    variant: str
    path: Path  # a directory (safetensors, int8) or a file (gguf)
    files: dict[str, str]  # name relative to `path` (the file name for gguf) -> sha256
    bytes: int
    notes: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        """`gguf-q8_0`, `safetensors-bfloat16`, `safetensors-int8`: the key of this export in metrics."""
        return f"{self.kind}-{self.variant}"

    def record(self) -> dict:
        """JSON-ready summary (paths as given, files with their hashes)."""
        return {"kind": self.kind, "variant": self.variant, "path": str(self.path), "bytes": self.bytes,
                "files": dict(sorted(self.files.items())), "notes": list(self.notes)}


def artifact_for(kind: str, variant: str, path: Path, notes: tuple[str, ...] = ()) -> ExportArtifact:
    """Hash what lies at `path` (every file below a directory, or the file itself)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        hashes = {str(p.relative_to(path)): sha256_file(p) for p in files}
        size = sum(p.stat().st_size for p in files)
    else:
        hashes = {path.name: sha256_file(path)}
        size = path.stat().st_size
    return ExportArtifact(kind, variant, path, hashes, size, notes)
