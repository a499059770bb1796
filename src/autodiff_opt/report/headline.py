"""The headline of a run: the searched schedule against the best heuristic and the best peer, on fresh seeds."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Entry:
    """One schedule of the final table: its name, NFE and FID on fresh seeds (mean and std over repeats)."""

    schedule: str
    nfe: int
    fid: float
    fid_std: float


@dataclass(frozen=True)
class Headline:
    searched: Entry
    best_heuristic: Entry | None
    best_peer: Entry | None

    @staticmethod
    def ratio(a: Entry, b: Entry | None) -> float | None:
        return a.fid / b.fid if b is not None and b.fid > 0 else None

    def lines(self) -> list[str]:
        """Plain sentences, e.g. 'searched [..] FID 1.23 at NFE 4: 0.54x the best heuristic (ddim_uniform, 2.28)'."""
        s = self.searched
        out = [f"searched schedule: FID {s.fid:.3f} ± {s.fid_std:.3f} at NFE {s.nfe} (fresh seeds)"]
        for label, other in (("best heuristic", self.best_heuristic), ("best peer", self.best_peer)):
            if other is not None:
                out.append(f"{label}: {other.schedule}, FID {other.fid:.3f} ± {other.fid_std:.3f} at NFE {other.nfe}"
                           f" → ratio {self.ratio(s, other):.2f}")
            else:
                out.append(f"{label}: none in this run")
        return out


def _entry(row: pd.Series) -> Entry:
    std = row.get("fid_final_std", 0.0)
    return Entry(str(row["schedule"]), int(row["nfe"]), float(row["fid_final"]), float(0.0 if pd.isna(std) else std))


def _best(final: pd.DataFrame, kind: str) -> Entry | None:
    rows = final[(final.kind == kind) & final.fid_final.notna()]
    return _entry(rows.loc[rows.fid_final.idxmin()]) if not rows.empty else None


def headline(final: pd.DataFrame) -> Headline | None:
    """None when the table has no searched row (final evaluation disabled or empty)."""
    searched = final[final.schedule == "searched"] if not final.empty else final
    if searched.empty:
        return None
    return Headline(_entry(searched.iloc[0]), _best(final, "heuristic"), _best(final, "peer"))
