"""How a weight file met the model it was loaded into: which of the model's tensors came
from the file, which the file lacks, which have another shape there, which of the file's
tensors the model has no place for. ``embcam.models`` computes it and refuses a partial
fit unless asked; the job records it in ``summary.json`` (``checkpoint``), and the
summary printout and the report say so when the fit was partial. No torch here: the
report reads it too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

SHOWN = 5  # names shown in a message, then a count


@dataclass(frozen=True)
class CheckpointLoad:
    path: str
    loaded: int  # model tensors set from the file
    missing: list[str] = field(default_factory=list)  # model tensors the file lacks
    unexpected: list[str] = field(default_factory=list)  # file tensors the model has no place for
    # model tensors the file has with another shape: {"name", "checkpoint": shape, "model": shape}
    mismatched: list[dict] = field(default_factory=list)
    # the source's own classifier, left out because the spec's head is +identity (not an error)
    dropped: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        """Some model tensor was not loaded (it keeps its seeded random init), or some file
        tensor was not used."""
        return bool(self.missing or self.unexpected or self.mismatched)

    @property
    def unloaded(self) -> int:
        return len(self.missing) + len(self.mismatched)

    def to_json(self) -> dict:
        return {**asdict(self), "partial": self.partial}

    @classmethod
    def from_json(cls, entry: dict) -> CheckpointLoad:
        return cls(**{k: entry[k] for k in ("path", "loaded", "missing", "unexpected", "mismatched", "dropped")
                      if k in entry})

    def problems(self) -> str:
        """What did not fit, in one line: a few names of each kind, then a count."""
        parts = []
        if self.mismatched:
            parts.append("shape mismatches (checkpoint vs model): " + _few(
                [f"{m['name']} {_shape(m['checkpoint'])} vs {_shape(m['model'])}" for m in self.mismatched]))
        if self.missing:
            parts.append("missing from the checkpoint: " + _few(self.missing))
        if self.unexpected:
            parts.append("in the checkpoint but not in the model: " + _few(self.unexpected))
        unloaded = (f"{self.unloaded} model tensor(s) not loaded, {self.loaded} loaded" if self.unloaded
                    else f"all {self.loaded} model tensors loaded")
        return f"{unloaded}; " + "; ".join(parts)

    def warning(self) -> str:
        """The line a run that went on with a partial fit shows (--allow-partial-checkpoint)."""
        return (f"WARNING: partial checkpoint {self.path} (--allow-partial-checkpoint): {self.problems()}; "
                "the tensors not loaded keep their seeded random init, so these heatmaps are not of the "
                "checkpoint's model")


def _few(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else "")


def _shape(shape) -> str:
    return str(tuple(shape))
