"""Dataset descriptions: the class list, its order, palette, background index and label parsing.

A description is plain data (JSON-able), so another cohort with other classes needs a JSON
file, not code.  Two built-ins follow METHOD.md exactly: LUAD-HistoSeg and BCSS-WSSS.

Label parsers read the patch-level label from a training file name:
- ``"bracket_spaced"``  (LUAD-HistoSeg): ``1031280-2300-27920-[1 0 0 1].png``
- ``"bracket_compact"`` (BCSS-WSSS):     ``TCGA-..._MPP-0.2500+0[1101].png``
Both take the LAST ``[...]`` group of the stem; ``"bracket"`` accepts either form.
A label must name at least one class (``[0 0 0 0]`` is refused): a training patch shows tissue.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from wsss.errors import DataError

__all__ = [
    "DatasetDescription",
    "LUAD_HISTOSEG",
    "BCSS_WSSS",
    "BUILTIN_DATASETS",
    "get_description",
    "description_source",
    "parse_label",
    "format_label",
]

LABEL_PARSERS = ("bracket_spaced", "bracket_compact", "bracket")


@dataclass(frozen=True)
class DatasetDescription:
    """What a dataset's files mean.

    name: short name ("luad-histoseg").
    class_names: tissue classes in label order, K of them (index 0..K-1).
    palette: RGB triples for indices 0..len(palette)-1 (K tissue colours, then background).
    background_index: the palette index of white background / excluded pixels (often K).
    label_parser: how train file names carry the label (see module docstring).
    background_is_tissue: NB: BCSS keeps white regions as tissue in pseudo masks; LUAD
        turns gray > 200 into background (METHOD.md, stage 2).
    white_threshold / min_object_px: LUAD's background rule (gray > 200, objects < 50 px removed).
    mpp: nominal microns per pixel of the patches (informational; bundles record it).
    """

    name: str
    class_names: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]
    background_index: int
    label_parser: str = "bracket_spaced"
    background_is_tissue: bool = False
    white_threshold: int = 200
    min_object_px: int = 50
    mpp: Optional[float] = None

    def __post_init__(self) -> None:
        def bad(what: str, value) -> DataError:
            return DataError(f"dataset description {self.name!r}: {what}, got {value!r}")

        if not isinstance(self.name, str) or not self.name.strip():
            raise DataError(f"dataset description: name must be a non-empty string, got {self.name!r}")
        # NB: names were str()-ed, so [1, null] became "1", "None"; and a repeated name overwrote
        # the other's row in wsss-eval's per-class table.
        if isinstance(self.class_names, (str, bytes)) or not isinstance(self.class_names, (list, tuple)):
            raise bad("class_names must be a list of names", self.class_names)
        if not all(isinstance(c, str) and c.strip() for c in self.class_names):
            raise bad("class_names must be non-empty strings", self.class_names)
        repeated = sorted({c for c in self.class_names if list(self.class_names).count(c) > 1})
        if repeated:
            raise bad(f"class_names must be distinct (repeated: {', '.join(repeated)})", self.class_names)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if not isinstance(self.palette, (list, tuple)) or not all(
                isinstance(rgb, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in rgb)
                for rgb in self.palette):
            raise bad("palette must be a list of [r, g, b] integer triples", self.palette)
        object.__setattr__(self, "palette", tuple(tuple(int(v) for v in rgb) for rgb in self.palette))
        for key in ("background_index", "white_threshold", "min_object_px"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(f"{key} must be a whole number", value)
        if not isinstance(self.background_is_tissue, bool):
            raise bad("background_is_tissue must be true or false", self.background_is_tissue)
        if not 0 <= self.white_threshold <= 255:
            raise bad("white_threshold must be a gray level in 0..255", self.white_threshold)
        if self.min_object_px < 0:
            raise bad("min_object_px must be 0 or more pixels", self.min_object_px)
        if self.mpp is not None and not (isinstance(self.mpp, (int, float)) and not isinstance(self.mpp, bool)
                                         and math.isfinite(self.mpp) and self.mpp > 0):
            raise bad("mpp must be a positive number of microns per pixel (or null)", self.mpp)
        k = len(self.class_names)
        if k < 1:
            raise DataError(f"dataset description {self.name!r}: class_names must not be empty")
        if len(self.palette) < k:
            raise DataError(f"dataset description {self.name!r}: palette has {len(self.palette)} colours, "
                            f"fewer than the {k} classes")
        for rgb in self.palette:
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise DataError(f"dataset description {self.name!r}: palette entries must be RGB triples "
                                f"in 0..255, got {rgb}")
        if 0 <= self.background_index < k:
            raise DataError(f"dataset description {self.name!r}: background_index "
                            f"{self.background_index} collides with a tissue class (0..{k - 1})")
        if not k <= self.background_index <= 255:
            raise DataError(f"dataset description {self.name!r}: background_index must be in "
                            f"[{k}, 255], got {self.background_index}")
        if self.label_parser not in LABEL_PARSERS:
            raise DataError(f"dataset description {self.name!r}: label_parser must be one of "
                            f"{', '.join(LABEL_PARSERS)}, got {self.label_parser!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def palette_flat(self) -> List[int]:
        """Palette as the 768-entry list PIL's putpalette wants (unused entries black)."""
        flat = [v for rgb in self.palette for v in rgb]
        return flat + [0] * (768 - len(flat))

    def to_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        d["palette"] = [list(rgb) for rgb in self.palette]
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "DatasetDescription":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"dataset description: unknown keys {unknown}; known keys are {sorted(known)}")
        missing = [k for k in ("name", "class_names", "palette", "background_index") if k not in d]
        if missing:
            raise DataError(f"dataset description: missing keys {missing}")
        return cls(**d)

    def save_json(self, path: str) -> None:
        from wsss.files import write_atomic

        text = json.dumps(self.to_dict(), indent=2)
        write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def load_json(cls, path: str) -> "DatasetDescription":
        try:
            # NB: save_json writes UTF-8 whatever the locale; -sig also takes a BOM (Windows editors)
            with open(path, encoding="utf-8-sig") as f:
                d = json.load(f)
        except UnicodeDecodeError as e:
            raise DataError(f"dataset description {path}: not UTF-8 text: {e}") from e
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"dataset description {path}: cannot read it as JSON: {e}") from e
        if not isinstance(d, dict):
            raise DataError(f"dataset description {path}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except DataError as e:
            raise DataError(f"{path}: {e}") from e


LUAD_HISTOSEG = DatasetDescription(
    name="luad-histoseg",
    class_names=("TE", "NEC", "LYM", "TAS"),
    palette=((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255)),
    background_index=4,
    label_parser="bracket_spaced",
    background_is_tissue=False,
    mpp=1.0,
)

BCSS_WSSS = DatasetDescription(
    name="bcss-wsss",
    class_names=("TUM", "STR", "LYM", "NEC"),
    palette=((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)),
    background_index=4,
    label_parser="bracket_compact",
    background_is_tissue=True,
    mpp=0.25,
)

BUILTIN_DATASETS: Dict[str, DatasetDescription] = {
    "luad-histoseg": LUAD_HISTOSEG,
    "luad": LUAD_HISTOSEG,
    "bcss-wsss": BCSS_WSSS,
    "bcss": BCSS_WSSS,
}


def description_source(name_or_path: str, root: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """Where a --dataset argument resolves to: ("builtin", its key in BUILTIN_DATASETS) or ("file",
    the JSON description's path); (None, None) where it names neither.  "auto": root/dataset.json
    where that is a file, else the built-in luad-histoseg.  A built-in name wins over a file of
    that name (get_description reads what this says; the CLIs' checks of inputs ask it too)."""
    if name_or_path == "auto":
        if root is not None and os.path.isfile(os.path.join(root, "dataset.json")):
            return "file", os.path.join(root, "dataset.json")
        return "builtin", "luad-histoseg"
    key = name_or_path.lower()
    if key in BUILTIN_DATASETS:
        return "builtin", key
    if os.path.isfile(name_or_path):
        return "file", name_or_path
    return None, None


def get_description(name_or_path: str, root: Optional[str] = None) -> DatasetDescription:
    """A built-in name ("luad", "bcss-wsss"), a JSON file, or "auto" (root/dataset.json, else LUAD)."""
    kind, where = description_source(name_or_path, root)
    if kind == "builtin":
        return BUILTIN_DATASETS[where]
    if kind == "file":
        return DatasetDescription.load_json(where)
    raise DataError(f"dataset {name_or_path!r}: not a built-in ({', '.join(sorted(BUILTIN_DATASETS))}) "
                    f"and not a JSON description file")


_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def parse_label(filename: str, description: DatasetDescription) -> List[int]:
    """Patch-level label (K zeros/ones) from a training file name; DataError naming the file."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    groups = _BRACKET.findall(stem)
    k = description.num_classes
    if not groups:
        raise DataError(f"{filename}: cannot parse the patch label: no '[...]' group in the file name "
                        f"(expected e.g. {format_label([1] + [0] * (k - 1), description)!r})")
    body = groups[-1].strip()
    kind = description.label_parser
    if kind == "bracket":
        kind = "bracket_spaced" if " " in body else "bracket_compact"
    tokens = body.split() if kind == "bracket_spaced" else list(body)
    if len(tokens) != k or any(t not in ("0", "1") for t in tokens):
        raise DataError(f"{filename}: cannot parse the patch label [{body}]: expected {k} digits 0/1 "
                        f"({'space separated' if kind == 'bracket_spaced' else 'without spaces'}) "
                        f"for classes {', '.join(description.class_names)}")
    label = [int(t) for t in tokens]
    if not any(label):
        # NB: the label says which tissue classes the patch holds (METHOD.md); one holding none
        # trained the classifier towards "nothing here" and got pseudo masks of class 0 throughout
        # (the Grad-CAM maps of absent classes are zeroed, so the argmax fell on index 0).
        raise DataError(f"{filename}: the patch label [{body}] names no class: every training patch holds at "
                        f"least one of {', '.join(description.class_names)} (leave background-only patches "
                        f"out of the train split)")
    return label


def format_label(label: Sequence[int], description: DatasetDescription) -> str:
    """'[1 0 0 1]' or '[1001]', the inverse of parse_label."""
    sep = "" if description.label_parser == "bracket_compact" else " "
    return "[" + sep.join(str(int(v)) for v in label) + "]"
