"""Options shared by the training CLIs (device, precision, seed, dataset), and the checks of
option values every command shares (``check_args``)."""
from __future__ import annotations

import argparse
import contextlib


def add_common(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    parser.add_argument("--dataset", default="auto",
                        help="dataset description: luad-histoseg, bcss-wsss, a JSON file, or auto "
                             "(DATA/dataset.json if present, else luad-histoseg) [auto]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [cpu]")
    parser.add_argument("--precision", default="fp32", type=_precision, metavar="{fp32,bf16}",
                        help="fp32 (float32), or bf16 (bfloat16) autocast [fp32]")
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes [0]")
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                        help="no progress bars (--no-progress as in wsss-infer)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="random seed [0]")


def _precision(text: str) -> str:
    """fp32 / bf16, also by wsss-infer's names (float32, bfloat16)."""
    value = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"choose fp32 (float32) or bf16 (bfloat16), got {text!r}")
    return value


def floats(text: str):
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def names(text: str):
    return tuple(v.strip() for v in text.split(",") if v.strip())


# (name, test, what it must be) for the numeric options the training commands share; a value a
# command does not have is skipped.  NB: each of these failed deep inside torch with a traceback
# (ValueError: Invalid learning rate, batch_size should be a positive integer, ...), or worse ran
# and wrote an untrained "result" (--max-steps-per-epoch -1).
_NUMBER_RULES = (
    ("epochs", lambda v: v >= 1, "at least 1"),
    ("batch_size", lambda v: v >= 1, "at least 1"),
    ("lr", lambda v: v > 0, "positive"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("workers", lambda v: v >= 0, "0 or more"),
    ("width", lambda v: 1 / 64 <= v <= 4, "in [1/64, 4] (the networks' channel multiplier)"),
    ("mu", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("max_steps_per_epoch", lambda v: v >= 1, "at least 1"),
    ("stop_after_epochs", lambda v: v >= 1, "at least 1"),
    ("gate_eps", lambda v: 0 <= v < 1, "in [0, 1)"),
    # (a batch of 8 tiles of 8192^2 is already 1.6 GB of RGB and 8.6 GB of K=4 scores)
    ("tile_size", lambda v: 16 <= v <= 8192, "between 16 and 8192 pixels"),
)


def check_args(args: argparse.Namespace, *, out_folders=("out",), out_files=("json", "bundle")) -> None:
    """WsssError naming the first option whose value cannot work, before any work is done: the
    numbers above, --layers (not empty), output folders and files that cannot be made (a path
    under a regular file, an existing file where a folder goes and vice versa)."""
    import math
    import os

    from wsss.files import missing_folders, probe_writable

    from wsss.errors import WsssError

    for name, ok, what in _NUMBER_RULES:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise WsssError(f"--{name.replace('_', '-')} must be {what}, got {value}")
    if getattr(args, "layers", None) is not None and not args.layers:
        raise WsssError("--layers names no layer (choose from b4_5, b5_2, bn7)")
    if getattr(args, "truth", None) and not os.path.isdir(args.truth):
        raise WsssError(f"--truth {args.truth}: no such folder")
    for name in out_folders + out_files:
        path = getattr(args, name, None)
        if not path:
            continue
        flag = f"--{name}"
        if name in out_folders and os.path.exists(path) and not os.path.isdir(path):
            raise WsssError(f"{flag} {path}: is a file, not a folder")
        if name in out_files and os.path.isdir(path):
            raise WsssError(f"{flag} {path}: is a folder, not a file")
        _, parent = missing_folders(os.path.dirname(os.path.abspath(path)))
        if not os.path.isdir(parent):
            raise WsssError(f"{flag} {path}: {parent} is a file, not a folder")
        try:
            probe_writable(parent)
        except OSError as e:
            raise WsssError(f"{flag} {path}: {parent} cannot be written ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------
# Outputs that would overwrite inputs, models of another cohort, one run per output folder


def same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name the same file or folder (links and hard links
    included; for one that does not exist yet, the same resolved path)."""
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:  # (one of them does not exist yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _inside(path, folder) -> bool:
    """Whether ``path`` lies inside ``folder`` (at any depth), links resolved."""
    import os

    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path != folder and path.startswith(folder.rstrip(os.sep) + os.sep)


def dataset_file(dataset, data) -> "str | None":
    """The description file --dataset reads: the JSON file it names, or DATA/dataset.json for
    "auto" (None: a built-in description, or none; as get_description resolves it)."""
    from wsss.data.description import description_source

    kind, where = description_source("auto" if dataset is None else dataset, data)
    return where if kind == "file" else None


def split_folder(data, split) -> "str | None":
    """DATA/SPLIT (or DATA itself when it is that split's folder), None where there is none."""
    from wsss.data.datasets import resolve_split_dir
    from wsss.errors import DataError

    if not data or not split:
        return None
    try:
        return resolve_split_dir(data, split)
    except DataError:
        return None


def check_outputs_spare_inputs(*, reads=(), read_folders=(), writes=(), write_folders=()) -> None:
    """WsssError (one line) before any work where a command would write over what it reads, or
    write one result over another.

    reads: (what, path) of the files the command reads, e.g. ("--classifier checkpoint", path);
    read_folders: (what, path) of the folders it reads (a split of the dataset, --truth, ...);
    writes: (what, path) of each file it writes, e.g. ("--json", path) or
    ("--out (its classifier.pt)", OUT/classifier.pt);
    write_folders: (what, path) of folders whose files it replaces or removes (the pseudo masks'
    layer folders).  Refused: a written file that is a read file (links, hard links and
    ``dir/./name`` spellings included), that lies inside a read folder, that is a folder or that
    another output names too; a written folder that is a read folder.  Entries whose path
    is None are skipped.

    NB: ``wsss-eval --json`` naming the --segmenter file replaced the checkpoint with the
    metrics, ``wsss-train-seg --bundle`` naming --classifier replaced it with the bundle."""
    import os

    from wsss.errors import WsssError

    reads = [(w, p) for w, p in reads if p]
    read_folders = [(w, p) for w, p in read_folders if p]
    writes = [(w, p) for w, p in writes if p]
    write_folders = [(w, p) for w, p in write_folders if p]
    for i, (what, path) in enumerate(writes):
        if os.path.isdir(path):
            raise WsssError(f"{what} {path}: is a folder, not a file (the command writes a file there; "
                            f"remove or rename that folder)")
        for source_what, source in reads:
            if same_file(path, source):
                also = "" if os.path.abspath(source) == os.path.abspath(path) else f" {source}"
                raise WsssError(f"{what} {path} is the {source_what}{also}: writing it would overwrite that "
                                f"input (name another file)")
        for source_what, folder in read_folders:
            if _inside(path, folder):
                raise WsssError(f"{what} {path} is inside the {source_what} {folder}: writing it there would "
                                f"change that input (name a file elsewhere)")
        for other_what, other in writes[:i]:
            if same_file(path, other):
                raise WsssError(f"{what} {path} is also {other_what} {other}: one would overwrite the other "
                                f"(name another file)")
    for what, folder in write_folders:
        for source_what, source in read_folders:
            if same_file(folder, source):
                raise WsssError(f"{what} {folder} is the {source_what}: the command replaces files there "
                                f"(name another output folder)")


def recorded_class_names(config) -> "list | None":
    """The class names a wsss checkpoint's config records: its dataset description's, else its
    class_names, else those of a built-in dataset it names; None for a checkpoint that records
    none (the reference code's)."""
    if not isinstance(config, dict):
        return None
    description = config.get("description")
    for names in ((description or {}).get("class_names") if isinstance(description, dict) else None,
                  config.get("class_names")):
        if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
            return list(names)
    dataset = config.get("dataset")
    if isinstance(dataset, str):
        from wsss.data.description import BUILTIN_DATASETS

        builtin = BUILTIN_DATASETS.get(dataset.lower())
        if builtin is not None:
            return list(builtin.class_names)
    return None


def _recorded_dataset_name(config) -> "str | None":
    description = config.get("description") if isinstance(config, dict) else None
    name = description.get("name") if isinstance(description, dict) else None
    if not isinstance(name, str) and isinstance(config, dict) and isinstance(config.get("dataset"), str):
        name = config["dataset"]
    return name if isinstance(name, str) and name != "auto" else None


def describe_dataset(dataset, data) -> str:
    """Where the dataset description comes from, for messages: 'DATA/dataset.json', a JSON file,
    or a built-in name."""
    path = dataset_file(dataset, data)
    if path is not None:
        return path
    return "the built-in luad-histoseg (no DATA/dataset.json)" if dataset in (None, "auto") else f"--dataset {dataset}"


def check_same_classes(flag: str, contents, description, source: str) -> None:
    """WsssError (one line, both lists, both files) when the checkpoint ``contents``
    (read_checkpoint's) records class names other than the dataset ``description``'s
    (``source`` says where that comes from); a checkpoint that records none (the reference
    code's) passes: only its class count is checked, when the network is built.

    NB: a segmenter trained on TE/NEC/LYM/TAS evaluated on a dataset whose 4 classes are other
    ones gave per-class scores under the wrong names, without a word."""
    from wsss.errors import WsssError

    recorded = recorded_class_names(contents.config)
    if recorded is None or list(recorded) == list(description.class_names):
        return
    name = _recorded_dataset_name(contents.config)
    raise WsssError(f"{flag} {contents.path} was trained on the classes {recorded}"
                    f"{f' (dataset {name!r})' if name else ''}, but the dataset's description {source} has the "
                    f"classes {list(description.class_names)}: a model of another cohort (use a checkpoint "
                    f"trained on this dataset, or the --dataset it was trained with)")


def load_network(kind: str, flag: str, path: str, description, source: str):
    """The classifier or segmenter network of checkpoint ``path``, read once, its recorded
    classes checked against ``description`` (check_same_classes) and its class count too."""
    from wsss.models.checkpoints import classifier_from_state_dict, read_checkpoint, segmenter_from_state_dict

    contents = read_checkpoint(path, expected_kind=kind)
    check_same_classes(flag, contents, description, source)
    build = classifier_from_state_dict if kind == "classifier" else segmenter_from_state_dict
    return build(contents.state_dict, num_classes=description.num_classes, where=f"checkpoint {contents.path}")


@contextlib.contextmanager
def locked_output_folder(path: str, flag: str = "--out"):
    """Context manager: the output folder made if missing and locked (wsss.files.lock_folder) for
    the command's run; a second run into the same folder meanwhile gets one line (WsssError).  On
    a failure, the folders this made are removed again where still empty.

    NB: two wsss-train-cls runs into one folder both ran to the end (one's checkpoints over the
    other's); two wsss-pseudo-masks runs left a mix of both runs' masks, and one ended with
    "No such file or directory" for the other's incomplete-marker."""
    import os

    from wsss.files import lock_output_folder, made_folders

    with made_folders(path):
        fd = lock_output_folder(path, f"{flag} {path}")
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)
