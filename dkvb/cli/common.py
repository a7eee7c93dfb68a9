"""What the commands share: the registry :func:`command` fills, config and request arguments, the
embeddings a request reads, and escaping text for the terminal."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from ..config import load_config, parse_assignments

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see experiments/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=5 (repeatable)")


def config_of(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] = add_config):
    """Register a subcommand: ``configure`` adds its arguments, the decorated function runs it."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, configure, fn)
        return fn

    return wrap


def method_params(items: list[str]) -> dict:
    return dict(parse_assignments(items, what="--param"))


def request_classes(args: argparse.Namespace) -> list[int | str]:
    """The classes a request names: ``--classes`` (comma-separated names), ``--class`` (one exact
    name), ``--classes-file`` (one exact name per line) and ``--class-ids`` (indices)."""
    names: list[int | str] = [n.strip() for v in args.classes for n in v.split(",") if n.strip()]
    names += args.class_names
    if args.classes_file:
        try:
            lines = Path(args.classes_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--classes-file {args.classes_file}: unreadable ({e})") from None
        names += [line for line in lines if line]
    for value in args.class_ids:
        for item in (i.strip() for i in value.split(",") if i.strip()):
            try:
                names.append(int(item))
            except ValueError:
                raise ValueError(f"--class-ids: {item!r} is not an integer class index") from None
    if not names:
        raise ValueError("name the classes: --classes NAME[,NAME], --class NAME, --classes-file FILE or "
                         "--class-ids INDEX[,INDEX]")
    return names


def request_args(p: argparse.ArgumentParser, *, method: str, method_help: str) -> None:
    """The classes, --method and --param of a forget request (``dkvb unlearn`` and ``dkvb forget``)."""
    p.add_argument("--classes", action="append", default=[], metavar="NAMES",
                   help="comma-separated class names (repeatable); a name is never read as an index")
    p.add_argument("--class", dest="class_names", action="append", default=[], metavar="NAME",
                   help="one class name taken exactly, commas, spaces and a leading '-' kept (repeatable; "
                   "write --class=-1 for names starting with '-')")
    p.add_argument("--classes-file", metavar="FILE", help="class names, one per line, taken exactly")
    p.add_argument("--class-ids", action="append", default=[], metavar="IDS",
                   help="comma-separated class indices (0-based, in the model's class order)")
    p.add_argument("--method", default=method, help=method_help)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter")


def store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH", help="model store folder (see dkvb.store)")


def data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", metavar="FILE", help="training embeddings with labels: .pt/.safetensors/.npz "
                   "holding x and y, .npy (+ labels), or an embedding-cache folder")
    p.add_argument("--test-embeddings", metavar="FILE", help="test embeddings with labels (for test metrics)")
    p.add_argument("--trust-embeddings", action="store_true", help="use --embeddings/--test-embeddings files that "
                   "do not name the encoder that made them (no 'encoder' entry; every .npy) without that check")
    p.add_argument("--config", metavar="YAML", help="experiment config whose cached embeddings to use instead")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of --config (repeatable)")


def service_data(args: argparse.Namespace):
    """(train, test) embeddings from --config or --embeddings/--test-embeddings, checked against the
    served model's class names and encoder; ``None`` where not given."""
    from ..embeddings_io import embeddings_from_config, load_embeddings_file
    from ..store import read_manifest

    if args.config and (args.embeddings or args.test_embeddings):
        raise ValueError("give either --config or --embeddings/--test-embeddings, not both")
    if args.test_embeddings and not args.embeddings:
        raise ValueError("--test-embeddings needs --embeddings (the training embeddings) too")
    if not (args.config or args.embeddings):
        return None, None
    manifest = read_manifest(args.model)
    if args.config:
        return embeddings_from_config(args.config, args.overrides, manifest)
    names = list(manifest["class_names"])
    trust = args.trust_embeddings
    test = load_embeddings_file(args.test_embeddings, names, manifest, trust=trust) if args.test_embeddings else None
    return load_embeddings_file(args.embeddings, names, manifest, trust=trust), test


def seed_int(text: str) -> int:
    """A ``--seed``: an integer that fits a 64-bit seed (argparse names the option on failure)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text}")
    return value


def print_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        print(f"  {key:17s} {100 * value:6.2f}%")


def shown(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (class names come from folder
    names and files: they must not move the cursor or recolour the terminal)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)

