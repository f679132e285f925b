"""Where one dataset's results are: a run's data/<dataset> folder, some stage folders of which may live elsewhere
(in a study, a stage no changed key reaches is shared with the base run; carso.study.Plan)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from carso.errors import UserError


@dataclass(frozen=True)
class Results:
    root: Path                                          # data/<dataset> of the run
    moved: dict[str, Path] = field(default_factory=dict)  # stage folder (e.g. "eval/at") -> where it is instead

    def path(self, relative: str) -> Path:
        """The file `relative` to data/<dataset> (e.g. "eval/at/metrics.json"), wherever its stage wrote it."""
        for folder, where in self.moved.items():
            if relative == folder or relative.startswith(folder + "/"):
                return where / relative[len(folder):].lstrip("/")
        return self.root / relative

    @classmethod
    def parse(cls, root: str | Path, moved: list[str]) -> "Results":
        """From the report's --root and --folders FOLDER=PATH arguments."""
        pairs = {}
        for item in moved:
            folder, sep, where = item.partition("=")
            if not sep or not folder or not where:
                raise UserError(f"--folders {item!r}: give FOLDER=PATH, e.g. eval/at=data/fashion_mnist/eval/at.")
            pairs[folder.rstrip("/")] = Path(where)
        return cls(Path(root), pairs)

    def arguments(self) -> list[str]:
        """The --folders arguments that say where the moved folders are (none for a plain run)."""
        return [f"{folder}={where}" for folder, where in self.moved.items()]
